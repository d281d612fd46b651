"""The loss contract of the train step, and the default decoder-LM loss.

A loss is `loss_fn(params, batch, rng) -> (loss, metrics)`: a float scalar to minimise and a dict of numeric
arrays to report. The step owns everything else (sharding, accumulation, clipping, the optimizer, checkpoints),
so distillation, GRPO, MTP or diffusion objectives are new losses, not new steps. The batch's layout is declared
next to the loss as `batch_axes`: each key's logical axis names (`pangu.parallel.rules`), from which the step
derives the batch's shardings.

With gradient accumulation the loss sees one microbatch (every batch array split on its leading axis) and its own
key; the step averages the loss and metrics over microbatches, except the counts in `SUMMED_METRICS`, which add.
"""

import importlib
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax

from pangu.models.config import TransformerConfig
from pangu.models.transformer import Decoder, cross_entropy_loss
from pangu.nn.moe import MOE_COLLECTION, moe_metrics
from pangu.parallel import rules
from pangu.train.config import TrainConfig

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, Metrics]]
BatchAxes = Mapping[str, Sequence[str | None]]

# Metrics that count things in the batch: summed over microbatches instead of averaged.
SUMMED_METRICS = frozenset({"tokens"})

# The batch `lm_loss` reads: inputs and targets [B, S] int32, mask [B, S] float32.
LM_BATCH_AXES: BatchAxes = MappingProxyType({
    "inputs": (rules.BATCH, rules.LENGTH),
    "targets": (rules.BATCH, rules.LENGTH),
    "mask": (rules.BATCH, rules.LENGTH),
})

# MoE step metrics taken as they are from `moe_metrics`; `moe_device_load` is added summed over layers.
_MOE_SCALARS = ("aux_loss", "router_z_loss", "imbalance_score", "max_over_mean_device_load", "dropped")


def lm_loss(model_config: TransformerConfig, train_config: TrainConfig) -> LossFn:
  """Next-token cross entropy + z-loss of the decoder; a MoE model adds its balance and router z-losses.

  Metrics: ce, z_loss, tokens (unmasked targets); for MoE also moe_aux_loss, moe_router_z_loss,
  moe_imbalance_score, moe_max_over_mean_device_load, moe_dropped and moe_device_load [P] (assignments per expert
  device, summed over MoE layers); see `pangu.nn.moe.moe_metrics`. Deterministic: the rng is unused.
  """
  model = Decoder(model_config)

  def loss_fn(params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
    del rng
    logits, variables = model.apply({"params": params}, batch["inputs"], mutable=[MOE_COLLECTION])
    loss, metrics = cross_entropy_loss(logits, batch["targets"], batch["mask"], z_loss=train_config.z_loss)
    if model_config.moe is not None:
      loss = add_moe_losses(loss, metrics, variables[MOE_COLLECTION])
    return loss, metrics

  return loss_fn


def add_moe_losses(loss: jax.Array, metrics: Metrics, collection) -> jax.Array:
  """loss + the MoE balance and router z-losses sown into `collection` (the `moe` collection of an apply);
  adds the moe_* metrics of `lm_loss` to `metrics` in place."""
  moe = moe_metrics(collection)
  metrics.update({f"moe_{name}": moe[name] for name in _MOE_SCALARS})
  metrics["moe_device_load"] = moe["device_load"].sum(axis=0)
  return loss + moe["aux_loss"] + moe["router_z_loss"]


def load_loss_factory(spec: str) -> Callable:
  """'package.module:name' (the CLI's --loss) -> that module's attribute `name`; a malformed spec is an error
  naming it."""
  module, sep, name = spec.partition(":")
  if not sep or not module or not name:
    raise ValueError(f"loss factory {spec!r} is not of the form module:factory")
  return getattr(importlib.import_module(module), name)
