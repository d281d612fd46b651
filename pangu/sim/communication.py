"""Collectives of one training or decode step, priced with `pangu.parallel.collectives` on the group's sub-grid.

Per layer and micro-batch (forward; the backward pass repeats the same exchanges):
- TP: Megatron's all-reduces of the attention and FFN (or shared-expert) outputs; with sequence parallelism
  each becomes an all-gather + reduce-scatter of the same volume (Korthikanti et al. 2022).
- EP: dispatch and combine of the routed tokens (Pangu Pro MoE / Ultra MoE):
  * flat: all-to-all over the EP group; each token sends one row per assignment (K rows), or, under MoGE with
    whole groups per device, one row per device carrying its K / P experts (our fixed exchange);
  * hierarchical: all-gather over the inter-node part of the EP group, all-to-all inside the node
    (`collectives.hierarchical_ep_all_to_all`);
  * ring (our CPU path for dropless top-K): all-gather tokens, reduce-scatter outputs over the EP group.
  With sequence parallelism each TP rank dispatches 1 / tp of the tokens and the received rows are
  all-gathered / reduce-scattered over the expert-tensor-parallel group for the TP-split experts
  (Megatron-core's all-to-all dispatcher; nothing to gather with ETP = 1); without it every TP rank
  dispatches all tokens and the expert outputs are all-reduced over TP.
- CP: keys and values all-gathered over the CP group (ring attention's volume).
- PP: one point-to-point send of the layer output per chunk boundary.
Per step: gradient reduction and ZeRO gathers over the data-parallel groups (`data_parallel_seconds`).
"""

from __future__ import annotations

import math

from pangu.parallel import collectives
from pangu.parallel.topology import Topology
from pangu.sim import operators
from pangu.sim.placement import Placement, split
from pangu.sim.plan import Infeasible, Plan
from pangu.sim.shapes import GQA, ModelShape


def all_reduce(group: Topology, nbytes: float) -> float:
  return collectives.all_reduce(group, group.axis_names, nbytes)


def all_gather(group: Topology, nbytes: float) -> float:
  return collectives.all_gather(group, group.axis_names, nbytes)


def reduce_scatter(group: Topology, nbytes: float) -> float:
  return collectives.reduce_scatter(group, group.axis_names, nbytes)


def point_to_point(group: Topology, nbytes: float) -> float:
  """One send between neighbouring members of `group` over its outermost link: α + V / B + static cost."""
  if group.num_devices == 1:
    return 0.0
  link = next(axis for axis in group.axes if axis.size > 1)
  return group.device.collective_static_cost + link.latency + nbytes / link.effective_bandwidth


def _axes_of(group: Topology, *, intra_node: bool) -> tuple[str, ...]:
  return tuple(axis.name for axis in group.axes if axis.intra_node == intra_node and axis.size > 1)


def layer_traffic_seconds(tp_group: Topology, etp_group: Topology, ep_group: Topology, plan: Plan, kind: str,
                          tokens: float, shape: ModelShape, activation_bytes: int,
                          routed_factor: float = 1.0) -> tuple[float, float]:
  """(TP, EP) traffic of one layer's forward.

  TP: an all-reduce of the [t, D] output of attention and of the dense FFN or shared experts (or the SP
  equivalent). EP: the routed experts' dispatch and combine, with their TP reduction.
  """
  output = tokens * shape.d_model * activation_bytes
  dense_ffn = kind == "dense" or bool(shape.moe.shared_dim)
  tensor = (2 if dense_ffn else 1) * all_reduce(tp_group, output)
  if kind == "dense":
    return tensor, 0.0
  return tensor, expert_exchange_seconds(etp_group, ep_group, plan, tokens, shape, activation_bytes, routed_factor)


def expert_exchange_seconds(etp_group: Topology, ep_group: Topology, plan: Plan, tokens: float, shape: ModelShape,
                            activation_bytes: int, routed_factor: float = 1.0) -> float:
  """Dispatch + combine of one MoE layer's forward; the busiest receiver scales the exchange.

  The TP reduction of the routed experts runs over their expert-tensor-parallel group: with sequence
  parallelism the received rows are all-gathered for the TP-split experts and reduce-scattered back
  (t · K · etp / tp rows of D), without it the expert outputs are all-reduced.
  """
  token_row = shape.d_model * activation_bytes
  sequence_split = plan.sequence_parallel and plan.tp > 1
  sent_tokens = tokens / plan.tp if sequence_split else tokens
  if sequence_split:
    gathered = tokens * shape.moe.top_k * plan.etp / plan.tp * token_row
    tensor = all_gather(etp_group, gathered) + reduce_scatter(etp_group, gathered)
  else:
    tensor = all_reduce(etp_group, tokens * token_row)
  if plan.ep == 1:
    return tensor
  if plan.ep_dispatch == "ring":
    volume = plan.ep * sent_tokens * token_row
    exchange = all_gather(ep_group, volume) + reduce_scatter(ep_group, volume)
  elif plan.ep_dispatch == "hierarchical":
    outer, inner = _axes_of(ep_group, intra_node=False), _axes_of(ep_group, intra_node=True)
    if not outer:
      raise Infeasible("placement", f"hierarchical dispatch needs an EP group that spans nodes; ep={plan.ep} "
                       "stays inside one")
    inner_rows = shape.moe.top_k * math.prod(ep_group.axis(name).size for name in inner) / plan.ep
    exchange = 2 * collectives.hierarchical_ep_all_to_all(ep_group, sent_tokens * token_row, max(inner_rows, 1.0),
                                                          outer=outer, inner=inner)
  else:
    rows = operators.dispatch_rows(shape, plan.ep)
    exchange = 2 * collectives.all_to_all(ep_group, ep_group.axis_names, sent_tokens * rows * token_row)
  return tensor + routed_factor * exchange


def context_parallel_seconds(cp_group: Topology, plan: Plan, tokens: float, shape: ModelShape,
                             activation_bytes: int) -> float:
  """Keys and values of the whole sequence gathered over the CP group, one layer's forward."""
  if plan.cp == 1:
    return 0.0
  attention = shape.attention
  width = attention.kv_cache_width()
  if isinstance(attention, GQA) and attention.n_kv_heads >= plan.tp:
    width /= plan.tp
  return all_gather(cp_group, plan.cp * tokens * width * activation_bytes)


def _sync(group: Topology, shards: int, grad_bytes: float, weight_bytes: float, zero_stage: int) -> float:
  """Gradient reduction (and ZeRO's parameter gather) over one data-parallel group, once per step.

  ZeRO 0: all-reduce. ZeRO >= 1: reduce-scatter over the shard group, all-reduce of the shard over the replica
  groups, all-gather of the updated parameters (stage 3 gathers per layer instead; see `zero3_layer_seconds`).
  """
  if group.num_devices == 1 or grad_bytes == 0:
    return 0.0
  if zero_stage == 0 or shards == 1:
    return all_reduce(group, grad_bytes)
  replicas, shard_group = split(group, shards)
  gather = 0.0 if zero_stage == 3 else all_gather(shard_group, weight_bytes)
  return reduce_scatter(shard_group, grad_bytes) + all_reduce(replicas, grad_bytes / shards) + gather


def data_parallel_seconds(placement: Placement, plan: Plan, dense_params: float, expert_params: float,
                          grad_bytes: int, weight_bytes: int) -> float:
  """Per-step gradient synchronisation of one stage's parameters (dense over dp · cp, experts over dp · cp / ep)."""
  dense = _sync(placement["data"], plan.dense_shards, dense_params * grad_bytes, dense_params * weight_bytes,
                plan.zero_stage)
  experts = _sync(placement["expert_data"], plan.expert_shards, expert_params * grad_bytes,
                  expert_params * weight_bytes, plan.zero_stage)
  return dense + experts


def zero3_layer_seconds(placement: Placement, plan: Plan, dense_params: float, expert_params: float,
                        grad_bytes: int, weight_bytes: int) -> tuple[float, float]:
  """ZeRO-3 traffic of one layer and micro-batch: (forward all-gather, backward all-gather + reduce-scatter)."""
  if plan.zero_stage != 3:
    return 0.0, 0.0
  forward = backward = 0.0
  for group, shards, params in ((placement["data"], plan.dense_shards, dense_params),
                                (placement["expert_data"], plan.expert_shards, expert_params)):
    if shards == 1 or params == 0:
      continue
    _, shard_group = split(group, shards)
    gather = all_gather(shard_group, params * weight_bytes)
    forward += gather
    backward += gather + reduce_scatter(shard_group, params * grad_bytes)
  return forward, backward
