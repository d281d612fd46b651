"""The train state and one jitted, sharded train step (loss, backward, clip, AdamW, metrics).

The objective is injected (`pangu.train.losses`): the step differentiates any `LossFn` over a batch laid out by
its `batch_axes`. Shardings come from the logical-axis rules: parameters and the matching AdamW moments follow the
params' logical names, batch arrays their declared axes (the batch axis split over the data-like mesh axes),
metrics are replicated.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pangu.models.config import TransformerConfig
from pangu.models.transformer import LAYERS_KEY, Decoder
from pangu.parallel import rules
from pangu.parallel.mesh import require_no_pipeline
from pangu.train.config import TrainConfig
from pangu.train.losses import LM_BATCH_AXES, SUMMED_METRICS, Batch, BatchAxes, LossFn, lm_loss
from pangu.train.optim import learning_rate_schedule, make_optimizer
from pangu.train.spikes import SpikeState, init_spike_state, update_spike_state

# Signals fed to the spike detector, in this order.
SPIKE_SIGNALS = ("loss", "log_grad_norm")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  spikes: SpikeState


@dataclasses.dataclass(frozen=True)
class TrainModel:
  """What the step needs of a model besides its loss, so models other than the decoder (e.g. the DiT of
  pangu.diffusion) train through the same step.

  Attributes:
    init_params: rng -> boxed (logically partitioned) params.
    layer_grad_norms: grads -> [L] global norm of each layer's gradients (the `per_layer_grad_norm` metric).
  """

  init_params: Callable[[jax.Array], Any]
  layer_grad_norms: Callable[[Any], jax.Array]


# A model the step trains: a decoder's config, or any other model as a `TrainModel`.
Model = TransformerConfig | TrainModel


def train_model(model: Model) -> TrainModel:
  """The `TrainModel` of a decoder config (Decoder init, per-decoder-layer norms); a `TrainModel` as it is."""
  if isinstance(model, TrainModel):
    return model
  return TrainModel(init_params=lambda rng: Decoder(model).init(rng, jnp.zeros((1, 1), jnp.int32))["params"],
                    layer_grad_norms=lambda grads: per_layer_grad_norms(model, grads))


def _init_state(model_config: Model, train_config: TrainConfig, rng: jax.Array) -> TrainState:
  """Boxed (logically partitioned) state: used under eval_shape for specs and, unboxed, for real init."""
  init_rng, state_rng = jax.random.split(rng)
  params = train_model(model_config).init_params(init_rng)
  opt_state = make_optimizer(train_config).init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=state_rng,
                    spikes=init_spike_state(train_config.spikes, len(SPIKE_SIGNALS)))


def state_shardings(model_config: Model, train_config: TrainConfig, mesh: Mesh,
                    logical_rules: rules.LogicalRules = rules.DEFAULT_RULES) -> TrainState:
  abstract = jax.eval_shape(lambda: _init_state(model_config, train_config, jax.random.key(0)))
  return rules.param_shardings(abstract, mesh, logical_rules)


def init_train_state(model_config: Model, train_config: TrainConfig, rng: jax.Array,
                     mesh: Mesh, logical_rules: rules.LogicalRules = rules.DEFAULT_RULES) -> TrainState:
  """Initialises every array directly in its target sharding (no full host copy)."""
  require_no_pipeline(mesh, "init_train_state")
  shardings = state_shardings(model_config, train_config, mesh, logical_rules)
  init = jax.jit(lambda r: nn.unbox(_init_state(model_config, train_config, r)), out_shardings=shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules):
    return init(rng)


def batch_sharding(mesh: Mesh, logical_rules: rules.LogicalRules = rules.DEFAULT_RULES) -> NamedSharding:
  """The sharding of a [B, S] batch array."""
  return rules.activation_sharding(mesh, (rules.BATCH, rules.LENGTH), logical_rules)


def batch_shardings(mesh: Mesh, batch_axes: BatchAxes = LM_BATCH_AXES,
                    logical_rules: rules.LogicalRules = rules.DEFAULT_RULES) -> dict[str, NamedSharding]:
  """One sharding per batch key, from its logical axis names."""
  return {key: rules.activation_sharding(mesh, axes, logical_rules) for key, axes in batch_axes.items()}


def check_batch_keys(batch: Batch, batch_axes: BatchAxes) -> None:
  """A batch must carry exactly the keys its loss declared axes for; jit's own pytree error would not say which."""
  if set(batch) != set(batch_axes):
    raise ValueError(f"batch has keys {sorted(batch)} but batch_axes declares {sorted(batch_axes)}")


def per_layer_grad_norms(model_config: TransformerConfig, grads: Any) -> jax.Array:
  """[L] global norm of each decoder layer's gradients, in either param layout."""
  if model_config.scanned:
    sq = [jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
          for g in jax.tree.leaves(grads[LAYERS_KEY])]
    return jnp.sqrt(sum(sq))
  return jnp.stack([optax.tree.norm(grads[f"layer_{i}"]) for i in range(model_config.n_layers)])


def _microbatches(batch: Batch, n: int) -> Batch:
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={n}")
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])
  return jax.tree.map(split, batch)


def make_train_step(model_config: Model, train_config: TrainConfig, mesh: Mesh,
                    logical_rules: rules.LogicalRules = rules.DEFAULT_RULES, *, loss_fn: LossFn | None = None,
                    batch_axes: BatchAxes | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Returns step(state, batch) -> (state, metrics), jitted with explicit in/out shardings.

  model_config: a decoder's config, or a `TrainModel`.
  loss_fn: the objective (`pangu.train.losses.LossFn`); None is `lm_loss(model_config, train_config)` (a decoder
    only: a `TrainModel` brings its own loss).
  batch_axes: logical axis names of each batch key (the jit's batch in_shardings); None is `LM_BATCH_AXES`.
  Each step splits `state.rng`: the new state keeps one half, the loss gets the other (one key per microbatch
  with gradient accumulation).
  Metrics: loss, grad_norm (before clipping), update_norm, learning_rate, per_layer_grad_norm [L], spike flags /
  event counts per (signal, threshold), and every metric the loss returns (`lm_loss`: ce, z_loss, tokens, moe_*).
  """
  require_no_pipeline(mesh, "make_train_step")
  model = train_model(model_config)
  if loss_fn is None and isinstance(model_config, TrainModel):
    raise ValueError("make_train_step: a TrainModel needs its loss_fn (lm_loss is the decoder's)")
  loss_fn = lm_loss(model_config, train_config) if loss_fn is None else loss_fn
  batch_axes = LM_BATCH_AXES if batch_axes is None else batch_axes
  tx = make_optimizer(train_config)
  schedule = learning_rate_schedule(train_config)
  accum = train_config.grad_accum_steps
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def gradients(params, batch: Batch, rng: jax.Array):
    if accum == 1:
      return grad_fn(params, batch, rng)
    micro, keys = _microbatches(batch, accum), jax.random.split(rng, accum)
    out_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), keys[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
    total, _ = jax.lax.scan(lambda acc, xs: (jax.tree.map(jnp.add, acc, grad_fn(params, *xs)), None), zeros,
                            (micro, keys))
    (loss, metrics), grads = total
    metrics = {k: v if k in SUMMED_METRICS else v / accum for k, v in metrics.items()}
    return (loss / accum, metrics), jax.tree.map(lambda g: g / accum, grads)

  def step(state: TrainState, batch: Batch):
    rng, loss_rng = jax.random.split(state.rng)
    (loss, loss_metrics), grads = gradients(state.params, batch, loss_rng)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    spikes = update_spike_state(train_config.spikes, state.spikes, jnp.stack([loss, jnp.log(grad_norm)]))
    metrics = {
        "loss": loss, "grad_norm": grad_norm, "update_norm": optax.tree.norm(updates),
        "learning_rate": schedule(state.step), "per_layer_grad_norm": model.layer_grad_norms(grads),
        "spike_flags": spikes.flagged, "spike_events": spikes.events,
    }
    if clash := sorted(set(metrics) & set(loss_metrics)):
      raise ValueError(f"the loss's metrics {clash} clash with the step's own metrics")
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng, spikes=spikes)
    return new_state, {**metrics, **loss_metrics}

  shardings = state_shardings(model_config, train_config, mesh, logical_rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(step, in_shardings=(shardings, batch_shardings(mesh, batch_axes, logical_rules)),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))

  def run(state: TrainState, batch: Batch):
    check_batch_keys(batch, batch_axes)
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules):
      return jitted(state, batch)

  return run
