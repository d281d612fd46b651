"""Memory per device: parameters, gradients, optimizer state, activations and the decode KV cache.

Sharding follows the plan: tensor-parallel weights split over tp, routed experts over expert_tp · ep, every
stage holds its own layers; ZeRO (Rajbhandari et al. 2020) shards the optimizer state (stage >= 1), the gradients
(>= 2) and the parameters (3) over the data-parallel shard groups. Activations are the tensors the backward
pass needs (`operators.Op.saved`) times the micro-batches a stage holds in flight (`pipeline.py`). A plan whose
busiest device exceeds its HBM is rejected with the reason (`check_fits`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

from pangu.sim.plan import Infeasible, Plan, Precision
from pangu.sim.shapes import GQA, ModelShape, ParamGroups

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class StageParams:
  """Parameters one device of a stage holds before ZeRO sharding: dense (TP-split or replicated) and experts."""

  dense: float
  experts: float


def stage_params(shape: ModelShape, kinds: list[str], plan: Plan, *, first: bool, last: bool) -> StageParams:
  """Local parameter counts of one stage: its layers, the embedding on the first stage, the head (and the MTP
  projections) on the last."""
  groups = _stage_groups(shape, tuple(kinds), first, last)
  return StageParams(dense=groups.tensor / plan.tp + groups.replicated, experts=groups.experts / (plan.etp * plan.ep))


@functools.lru_cache(maxsize=4096)
def _stage_groups(shape: ModelShape, kinds: tuple[str, ...], first: bool, last: bool) -> ParamGroups:
  groups = ParamGroups(0, 0, 0)
  for kind, count in collections.Counter(kinds).items():
    groups = groups + shape.layer_params(kind) * count
  tables = shape.vocab_size * shape.d_model
  if first:
    groups = groups + ParamGroups(tables, 0, 0)
  if last:
    groups = groups + ParamGroups(0 if shape.tie_embeddings and first else tables, shape.d_model, 0)
    groups = groups + shape.mtp_projection_params() * shape.mtp_layers
  return groups


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
  """Bytes on the busiest device.

  Attributes:
    params, grads, optimizer: training state after ZeRO sharding (decode: weights only).
    activations: saved activations of the micro-batches in flight (decode: 0).
    kv_cache: the decode KV cache.
    capacity: usable device memory.
  """

  params: float
  grads: float
  optimizer: float
  activations: float
  kv_cache: float
  capacity: float

  @property
  def total(self) -> float:
    return self.params + self.grads + self.optimizer + self.activations + self.kv_cache

  def gib(self) -> dict[str, float]:
    fields = ("params", "grads", "optimizer", "activations", "kv_cache", "total", "capacity")
    return {name: round(getattr(self, name) / GiB, 3) for name in fields}


def training_state_bytes(params: StageParams, plan: Plan, precision: Precision) -> tuple[float, float, float]:
  """(parameter, gradient, optimizer-state) bytes on one device under the plan's ZeRO stage."""
  def sharded(stage: int) -> float:
    if plan.zero_stage < stage:
      return params.dense + params.experts
    return params.dense / plan.dense_shards + params.experts / plan.expert_shards

  return (precision.weight_bytes * sharded(3), precision.grad_bytes * sharded(2),
          precision.optimizer_bytes * sharded(1))


def training_memory(params: StageParams, plan: Plan, precision: Precision, activations: float,
                    capacity: float) -> MemoryBreakdown:
  weights, grads, optimizer = training_state_bytes(params, plan, precision)
  return MemoryBreakdown(params=weights, grads=grads, optimizer=optimizer, activations=activations, kv_cache=0.0,
                         capacity=capacity)


def kv_cache_bytes_per_sequence(shape: ModelShape, plan: Plan, context: int, kv_bytes: int) -> float:
  """Cache of one sequence on one device: GQA kv heads split over tp when there are enough of them; MLA's
  latent is replicated over tp."""
  attention = shape.attention
  width = attention.kv_cache_width()
  if isinstance(attention, GQA) and attention.n_kv_heads >= plan.tp:
    width /= plan.tp
  return context * width * kv_bytes * shape.n_layers


def check_fits(memory: MemoryBreakdown) -> None:
  """Raises Infeasible("memory", ...) naming the largest parts when the busiest device overflows."""
  if memory.total <= memory.capacity:
    return
  parts = memory.gib()
  detail = ", ".join(f"{name} {parts[name]:.1f}" for name in ("params", "grads", "optimizer", "activations",
                                                                 "kv_cache") if parts[name] > 0)
  raise Infeasible("memory", f"needs {parts['total']:.1f} GiB of {parts['capacity']:.1f} GiB ({detail})")
