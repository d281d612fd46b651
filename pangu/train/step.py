"""The train state and one jitted, sharded train step (forward, backward, clip, AdamW, metrics).

Shardings come from the logical-axis rules: parameters and the matching AdamW moments follow the params'
logical names, the batch is split over the data-like mesh axes, metrics are replicated.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pangu.models.config import TransformerConfig
from pangu.models.transformer import LAYERS_KEY, Decoder, cross_entropy_loss
from pangu.nn.moe import MOE_COLLECTION, moe_metrics
from pangu.parallel import rules
from pangu.train.config import TrainConfig
from pangu.train.optim import learning_rate_schedule, make_optimizer
from pangu.train.spikes import SpikeState, init_spike_state, update_spike_state

Batch = dict[str, jax.Array]
# Signals fed to the spike detector, in this order.
SPIKE_SIGNALS = ("loss", "log_grad_norm")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  spikes: SpikeState


def _init_state(model_config: TransformerConfig, train_config: TrainConfig, rng: jax.Array) -> TrainState:
  """Boxed (logically partitioned) state: used under eval_shape for specs and, unboxed, for real init."""
  init_rng, state_rng = jax.random.split(rng)
  params = Decoder(model_config).init(init_rng, jnp.zeros((1, 1), jnp.int32))["params"]
  opt_state = make_optimizer(train_config).init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=state_rng,
                    spikes=init_spike_state(train_config.spikes, len(SPIKE_SIGNALS)))


def state_shardings(model_config: TransformerConfig, train_config: TrainConfig, mesh: Mesh,
                    logical_rules: rules.LogicalRules = rules.DEFAULT_RULES) -> TrainState:
  abstract = jax.eval_shape(lambda: _init_state(model_config, train_config, jax.random.key(0)))
  return rules.param_shardings(abstract, mesh, logical_rules)


def init_train_state(model_config: TransformerConfig, train_config: TrainConfig, rng: jax.Array,
                     mesh: Mesh, logical_rules: rules.LogicalRules = rules.DEFAULT_RULES) -> TrainState:
  """Initialises every array directly in its target sharding (no full host copy)."""
  shardings = state_shardings(model_config, train_config, mesh, logical_rules)
  init = jax.jit(lambda r: nn.unbox(_init_state(model_config, train_config, r)), out_shardings=shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules):
    return init(rng)


def batch_sharding(mesh: Mesh, logical_rules: rules.LogicalRules = rules.DEFAULT_RULES) -> NamedSharding:
  return rules.activation_sharding(mesh, (rules.BATCH, rules.LENGTH), logical_rules)


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


def make_train_step(model_config: TransformerConfig, train_config: TrainConfig, mesh: Mesh,
                    logical_rules: rules.LogicalRules = rules.DEFAULT_RULES
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Returns step(state, batch) -> (state, metrics), jitted with explicit in/out shardings.

  batch: {"inputs": [B, S] int32, "targets": [B, S] int32, "mask": [B, S] float32}.
  Metrics: loss, ce, z_loss, grad_norm (before clipping), update_norm, learning_rate, per_layer_grad_norm [L],
  spike flags / event counts per (signal, threshold). A MoE model adds its layers' balance and router z-losses
  to the loss and reports moe_aux_loss, moe_router_z_loss, moe_imbalance_score (mean over MoE layers),
  moe_max_over_mean_device_load, moe_dropped (assignments dropped by capacity dispatch) and moe_device_load
  [P] (assignments per expert device, summed over MoE layers); see `pangu.nn.moe.moe_metrics`.
  """
  model = Decoder(model_config)
  tx = make_optimizer(train_config)
  schedule = learning_rate_schedule(train_config)
  accum = train_config.grad_accum_steps

  def loss_fn(params, micro):
    logits, variables = model.apply({"params": params}, micro["inputs"], mutable=[MOE_COLLECTION])
    loss, aux = cross_entropy_loss(logits, micro["targets"], micro["mask"], z_loss=train_config.z_loss)
    if model_config.moe is not None:
      moe = moe_metrics(variables[MOE_COLLECTION])
      loss = loss + moe["aux_loss"] + moe["router_z_loss"]
      aux = {**aux, "moe": moe}
    return loss, aux

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def gradients(params, batch: Batch):
    if accum == 1:
      return grad_fn(params, batch)
    micro = _microbatches(batch, accum)
    out_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
    total, _ = jax.lax.scan(lambda acc, m: (jax.tree.map(jnp.add, acc, grad_fn(params, m)), None), zeros, micro)
    return jax.tree.map(lambda x: x / accum, total)

  def step(state: TrainState, batch: Batch):
    (loss, aux), grads = gradients(state.params, batch)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    spikes = update_spike_state(train_config.spikes, state.spikes, jnp.stack([loss, jnp.log(grad_norm)]))
    metrics = {
        "loss": loss, "ce": aux["ce"], "z_loss": aux["z_loss"], "tokens": batch["mask"].sum(),
        "grad_norm": grad_norm, "update_norm": optax.tree.norm(updates),
        "learning_rate": schedule(state.step), "per_layer_grad_norm": per_layer_grad_norms(model_config, grads),
        "spike_flags": spikes.flagged, "spike_events": spikes.events,
    }
    if model_config.moe is not None:
      moe = aux["moe"]
      metrics.update({f"moe_{name}": moe[name] for name in
                      ("aux_loss", "router_z_loss", "imbalance_score", "max_over_mean_device_load", "dropped")})
      metrics["moe_device_load"] = moe["device_load"].sum(axis=0)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, spikes=spikes)
    return new_state, metrics

  shardings = state_shardings(model_config, train_config, mesh, logical_rules)
  data = batch_sharding(mesh, logical_rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(step, in_shardings=(shardings, {"inputs": data, "targets": data, "mask": data}),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))

  def run(state: TrainState, batch: Batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules):
      return jitted(state, batch)

  return run
