"""Decode step time (TPOT), throughput and memory of an inference instance.

One decode step adds a token to each of `batch` sequences. Attention runs data-parallel over dp groups of tp
devices (each group holds batch / dp sequences and their KV cache); the routed experts split over ep of the
devices and tp; every layer all-reduces over TP and exchanges tokens over EP (`communication.py`).

At decode sizes the operators are memory-bound: every step streams the weights (only the experts some token
picked, `imbalance.expected_distinct_experts`) and each sequence's cache (Pangu Pro MoE §5: decode on 800I A2
is bound by memory access and communication). The static per-op costs of msmodeling matter at small batches.
"""

from __future__ import annotations

import collections
import dataclasses

from pangu.parallel.topology import Topology
from pangu.sim import communication, operators
from pangu.sim.imbalance import straggler_factor
from pangu.sim.memory import MemoryBreakdown, check_fits, kv_cache_bytes_per_sequence, stage_params
from pangu.sim.placement import place
from pangu.sim.plan import W8A8, DecodeWorkload, Infeasible, Plan, Precision
from pangu.sim.shapes import ModelShape
from pangu.sim.training import SimOptions, check_divisibility


@dataclasses.dataclass(frozen=True)
class DecodeEstimate:
  """One decode step.

  Attributes:
    shape_name, total_params: the model.
    plan, batch: the instance layout and its sequences.
    tpot_seconds: time per output token (one step).
    tokens_per_second_per_device: batch / TPOT / devices.
    memory: the busiest device (weights + KV cache).
    weight_seconds: time spent streaming weights (the rest: KV cache, compute, traffic, static costs).
    straggler: the routed-expert slowdown of the most loaded EP device (1.0 = balanced).
    breakdown: seconds per step by part.
  """

  shape_name: str
  total_params: int
  plan: Plan
  batch: int
  tpot_seconds: float
  tokens_per_second_per_device: float
  memory: MemoryBreakdown
  weight_seconds: float
  straggler: float
  breakdown: dict[str, float]


def simulate_decode(shape: ModelShape, plan: Plan, workload: DecodeWorkload, topology: Topology,
                    precision: Precision = W8A8, options: SimOptions = SimOptions()) -> DecodeEstimate:
  """TPOT and memory of one decode step; raises Infeasible with the reason."""
  if plan.pp != 1 or plan.cp != 1:
    raise Infeasible("plan", f"decode plans use pp = cp = 1, got pp={plan.pp}, cp={plan.cp}")
  check_divisibility(shape, plan)
  if workload.batch % plan.dp:
    raise Infeasible("batch", f"batch {workload.batch} does not split over dp={plan.dp}")
  placement = place(topology, plan)
  device, dtype = topology.device, precision.compute_dtype
  device.peak_flops(dtype)
  sequences = workload.batch // plan.dp

  params = stage_params(shape, list(shape.layer_kinds()[:shape.n_layers]), plan, first=True, last=True)
  kv = sequences * kv_cache_bytes_per_sequence(shape, plan, workload.context, precision.kv_bytes)
  memory = MemoryBreakdown(params=precision.weight_bytes * (params.dense + params.experts), grads=0.0, optimizer=0.0,
                           activations=0.0, kv_cache=kv, capacity=options.memory_fraction * device.hbm_bytes)
  check_fits(memory)

  ctx = operators.OpContext(tokens=sequences, kv_len=workload.context, tp=plan.tp, ep=plan.ep, expert_tp=plan.etp,
                            activation_bytes=precision.activation_bytes, weight_bytes=precision.weight_bytes,
                            kv_bytes=precision.kv_bytes, fused_attention=True, decode=True)
  straggler = 1.0
  if shape.moe is not None:
    group_tokens = plan.ep * sequences * plan.etp // plan.tp  # tokens the EP group routes per step
    straggler = straggler_factor(shape.moe, plan.ep, group_tokens, samples=options.imbalance_samples)
  compute = traffic = weights = 0.0
  bandwidth = device.hbm_bandwidth * device.memory_efficiency
  groups = (placement["tp"], placement["etp"], placement["ep"])
  for kind, count in collections.Counter(shape.layer_kinds()[:shape.n_layers]).items():
    ops = operators.layer_ops(shape, kind, ctx, plan.ep_dispatch)
    compute += count * operators.forward_seconds(ops, device, dtype, dict(options.op_costs), routed_factor=straggler)
    weights += count * sum(op.weights for op in ops) / bandwidth
    traffic += count * sum(communication.layer_traffic_seconds(*groups, plan, kind, sequences, shape,
                                                               precision.activation_bytes, straggler))
  head = operators.head_ops(shape.replace(mtp_layers=0), ctx, with_loss=False)
  compute += operators.forward_seconds(head + operators.embedding_ops(shape, ctx), device, dtype,
                                       dict(options.op_costs))
  tpot = compute + traffic
  return DecodeEstimate(shape_name=shape.name, total_params=shape.param_count(), plan=plan, batch=workload.batch,
                        tpot_seconds=tpot, tokens_per_second_per_device=workload.batch / tpot / plan.num_devices,
                        memory=memory, weight_seconds=weights, straggler=straggler,
                        breakdown={"operators": compute, "traffic": traffic})
