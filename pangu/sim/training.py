"""Training step time, MFU and memory of one (model shape, plan, workload, topology).

Composition (per micro-batch on the busiest pipeline stage, then the schedule, then per-step work):

1. Check the plan divides the model (heads, widths, experts) and place its groups on the topology.
2. Split the layers (MTP modules last, no-op padding) over pp · vpp chunks.
3. Per layer kind: operators (`operators.py`) forward, backward and recomputation, plus TP, CP and EP
   traffic (`communication.py`); routed-expert work and EP exchanges scale with the straggler factor sampled
   from the router (`imbalance.py`). With `ep_overlap` a MoE layer costs max(compute, EP traffic).
4. Stage time = its layers + embedding / output head + pipeline sends; step = the pipeline schedule
   (`pipeline.py`) + exposed gradient synchronisation + the optimizer update + a fixed per-step overhead.
5. Memory of the busiest device (`memory.py`); plans that overflow are rejected with the reason.

MFU = model FLOPs / (devices · peak · step time), with model FLOPs = 3 x the forward matmul FLOPs
(causal attention counted as half of S², recomputation and padding excluded).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

from pangu.config_checks import positive_numbers
from pangu.parallel.topology import DeviceSpec, Topology
from pangu.sim import communication, operators, pipeline
from pangu.sim.imbalance import straggler_factor
from pangu.sim.memory import MemoryBreakdown, check_fits, stage_params, training_memory
from pangu.sim.placement import place
from pangu.sim.plan import DISPATCHES, MIXED_BF16, Infeasible, Plan, Precision, TrainWorkload
from pangu.sim.shapes import GQA, ModelShape


@dataclasses.dataclass(frozen=True)
class ExchangeCost:
  """Measured time / modelled time of a MoE layer's feed-forward (its `experts` family ops plus the EP exchange)
  under expert parallelism, forward and backward apart (1: the model holds)."""

  forward_scale: float = 1.0
  backward_scale: float = 1.0

  def __post_init__(self):
    positive_numbers(self, "forward_scale", "backward_scale")


@dataclasses.dataclass(frozen=True)
class SimOptions:
  """Facts about the software stack, not chosen per plan.

  Attributes:
    fused_attention: FlashAttention-style attention core (Ascend's NPU Fusion Attention); False for our CPU
      decoder, which writes the S x S scores.
    overlap_grad_reduce: hide the gradient reduction under the last micro-batch's backward (Megatron).
    expert_block_rows: None for a grouped-matmul kernel; 128 for our CPU `blocked` experts.
    step_overhead: fixed seconds per step (dispatch, host work); calibrated on CPU, 0 for the presets.
    op_costs: measured cost of each operator family relative to the roofline (`operators.FamilyCost`: forward
      scale, backward / forward ratio), as (family, cost) pairs; a family not listed follows the roofline with
      a 2x backward. Calibrated on CPU by profiling each family's library module as our decoder runs it (in
      its layer scan, on [B, S, D] activations), whose backward costs 4-6x its forward.
    optimizer_bytes_per_param: effective HBM bytes of one AdamW update per parameter; None: the precision's
      read/write count (`Precision.optimizer_traffic_bytes`); calibrated on CPU.
    ep_costs: measured cost of a MoE layer's feed-forward under expert parallelism, per `Plan.ep_dispatch`, as
      (dispatch, ExchangeCost) pairs: its `experts` family ops and EP exchange scaled together; a dispatch not
      listed follows the model. Calibrated on CPU by running the library's MoE layer on an expert-parallel mesh
      through the exchange it really uses (the fixed all-to-all or the ring), which the single-device profiles
      and the α-β exchange alone under-predicted.
    max_noop_layers: no-op layers a plan may add so that pp · vpp divides the layers.
    memory_fraction: share of device memory a plan may use.
    imbalance_samples: routed batches sampled per straggler factor.
  """

  fused_attention: bool = True
  overlap_grad_reduce: bool = True
  expert_block_rows: int | None = None
  step_overhead: float = 0.0
  op_costs: tuple[tuple[str, operators.FamilyCost], ...] = ()
  optimizer_bytes_per_param: float | None = None
  ep_costs: tuple[tuple[str, ExchangeCost], ...] = ()
  max_noop_layers: int = 4
  memory_fraction: float = 1.0
  imbalance_samples: int = 32

  def __post_init__(self):
    if self.step_overhead < 0:
      raise ValueError(f"SimOptions.step_overhead must be >= 0, got {self.step_overhead}")
    for family, cost in self.op_costs:
      if family not in operators.FAMILIES or not isinstance(cost, operators.FamilyCost):
        raise ValueError(f"SimOptions.op_costs entries must be (family in {operators.FAMILIES}, FamilyCost), got "
                         f"{(family, cost)!r}")
    for dispatch, cost in self.ep_costs:
      if dispatch not in DISPATCHES or not isinstance(cost, ExchangeCost):
        raise ValueError(f"SimOptions.ep_costs entries must be (dispatch in {DISPATCHES}, ExchangeCost), got "
                         f"{(dispatch, cost)!r}")
    if self.optimizer_bytes_per_param is not None and not self.optimizer_bytes_per_param > 0:
      raise ValueError(f"SimOptions.optimizer_bytes_per_param must be > 0 or None, got "
                       f"{self.optimizer_bytes_per_param}")
    if not 0 < self.memory_fraction <= 1:
      raise ValueError(f"SimOptions.memory_fraction must be in (0, 1], got {self.memory_fraction}")
    if self.max_noop_layers < 0 or self.imbalance_samples < 1:
      raise ValueError(f"SimOptions.max_noop_layers must be >= 0 and imbalance_samples >= 1, got "
                       f"{self.max_noop_layers} and {self.imbalance_samples}")


@dataclasses.dataclass(frozen=True)
class TrainEstimate:
  """What one plan achieves.

  Attributes:
    plan: the plan.
    step_seconds: one optimizer step.
    tokens_per_second: global tokens per second.
    mfu: model FLOPs utilisation.
    memory: the busiest device.
    bubble: the pipeline's idle fraction.
    straggler: the routed-expert slowdown of the most loaded EP device (1.0 = balanced).
    micro_batches: micro-batches per data-parallel rank and step.
    breakdown: seconds per step by part (compute, tp/ep/cp/pp traffic, bubble, dp sync, optimizer, overhead).
  """

  plan: Plan
  step_seconds: float
  tokens_per_second: float
  mfu: float
  memory: MemoryBreakdown
  bubble: float
  straggler: float
  micro_batches: int
  breakdown: dict[str, float]


def check_divisibility(shape: ModelShape, plan: Plan) -> None:
  """Infeasible("divisibility", ...) when tp, ep or cp do not split the model."""
  attention = shape.attention
  if attention.n_heads % plan.tp:
    raise Infeasible("divisibility", f"tp={plan.tp} does not divide {attention.n_heads} heads")
  if isinstance(attention, GQA) and attention.n_kv_heads % plan.tp and plan.tp % attention.n_kv_heads:
    raise Infeasible("divisibility", f"tp={plan.tp} and {attention.n_kv_heads} kv heads do not divide each other")
  widths = {"d_ff": shape.d_ff} if shape.n_dense_layers else {}
  if shape.moe is not None and shape.moe.shared_dim:
    widths["shared_dim"] = shape.moe.shared_dim
  for name, width in widths.items():
    if width % plan.tp:
      raise Infeasible("divisibility", f"tp={plan.tp} does not divide {name}={width}")
  if plan.ep > 1 and shape.moe is None:
    raise Infeasible("divisibility", f"ep={plan.ep} on a dense model")
  if shape.moe is not None and shape.moe.num_experts % plan.ep:
    raise Infeasible("divisibility", f"ep={plan.ep} does not divide {shape.moe.num_experts} experts")
  if shape.moe is not None and shape.moe.expert_dim % plan.etp:
    raise Infeasible("divisibility", f"expert_tp={plan.etp} does not divide expert_dim={shape.moe.expert_dim}")


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """One layer and micro-batch on the busiest device.

  Attributes:
    forward, backward: seconds, traffic and recomputation included.
    compute_backward: the backward's compute alone (what can hide the gradient reduction).
    expert_forward, expert_backward: the `experts` family's compute within them (after `SimOptions.ep_costs`).
    saved: activation bytes kept for the backward pass.
    tp_traffic, cp_traffic: one pass's TP and CP collectives.
    ep_forward, ep_backward: the EP exchange of the forward and of the backward pass.
  """

  forward: float
  backward: float
  compute_backward: float
  expert_forward: float
  expert_backward: float
  saved: float
  tp_traffic: float
  ep_forward: float
  ep_backward: float
  cp_traffic: float


@functools.lru_cache(maxsize=65536)
def _layer_cost(shape: ModelShape, kind: str, plan: Plan, ctx: operators.OpContext, groups: tuple[Topology, ...],
                precision: Precision, straggler: float, op_costs: tuple[tuple[str, operators.FamilyCost], ...],
                ep_costs: tuple[tuple[str, ExchangeCost], ...]) -> LayerCost:
  """Forward and backward seconds and saved bytes of one layer and micro-batch; cached, since the pipeline and
  data-parallel sizes of a search do not change it (`plan` arrives with them normalised away)."""
  tp_group, etp_group, ep_group, cp_group = groups
  device, dtype, a = tp_group.device, precision.compute_dtype, precision.activation_bytes
  costs = dict(op_costs)
  ops = operators.layer_ops(shape, kind, ctx, plan.ep_dispatch)
  measured = dict(ep_costs).get(plan.ep_dispatch) if kind == "moe" and plan.ep > 1 else None
  scale = measured or ExchangeCost()
  experts = [op for op in ops if op.family == "experts"]
  others = [op for op in ops if op.family != "experts"]
  seconds = lambda chosen, backward=False: operators.forward_seconds(chosen, device, dtype, costs,
                                                                     routed_factor=straggler, backward=backward)
  expert_forward, expert_backward = scale.forward_scale * seconds(experts), scale.backward_scale * seconds(experts, True)
  compute_forward = seconds(others) + expert_forward
  compute_backward = seconds(others, True) + expert_backward
  recompute = operators.recompute_seconds(ops, device, dtype, plan.recompute, costs, routed_factor=straggler)
  tp_traffic, ep_traffic = communication.layer_traffic_seconds(tp_group, etp_group, ep_group, plan, kind, ctx.tokens,
                                                               shape, a, straggler)
  ep_forward, ep_backward = scale.forward_scale * ep_traffic, scale.backward_scale * ep_traffic
  cp_traffic = communication.context_parallel_seconds(cp_group, plan, ctx.tokens, shape, a)

  def with_traffic(compute: float, ep: float) -> float:
    hidden = max(compute, ep) if plan.ep_overlap else compute + ep
    return hidden + tp_traffic + cp_traffic

  forward = with_traffic(compute_forward, ep_forward)
  backward = with_traffic(compute_backward, ep_backward) + (
      with_traffic(recompute, ep_forward) if plan.recompute == "full" else recompute)
  layer_input = a * ctx.norm_tokens * shape.d_model
  return LayerCost(forward=forward, backward=backward, compute_backward=compute_backward,
                   expert_forward=expert_forward, expert_backward=expert_backward,
                   saved=operators.saved_bytes(ops, plan.recompute, layer_input), tp_traffic=tp_traffic,
                   ep_forward=ep_forward, ep_backward=ep_backward, cp_traffic=cp_traffic)


@functools.lru_cache(maxsize=65536)
def _ends_cost(shape: ModelShape, ctx: operators.OpContext, device: DeviceSpec, dtype: str,
               op_costs: tuple[tuple[str, operators.FamilyCost], ...]) -> tuple[float, float, float]:
  """(embedding forward + backward seconds, output head forward + backward seconds, head saved bytes)."""
  costs = dict(op_costs)
  embedding, head = operators.embedding_ops(shape, ctx), operators.head_ops(shape, ctx)
  seconds = lambda ops: (operators.forward_seconds(ops, device, dtype, costs)
                         + operators.forward_seconds(ops, device, dtype, costs, backward=True))
  return seconds(embedding), seconds(head), sum(op.saved for op in head)


@functools.lru_cache(maxsize=1024)
def model_flops_per_sequence(shape: ModelShape, seq_len: int) -> float:
  """Training FLOPs of one sequence: 3 x forward matmul FLOPs on one device (no parallelism, no padding)."""
  ctx = operators.OpContext(tokens=seq_len, kv_len=seq_len)
  counts = collections.Counter(shape.layer_kinds())
  forward = sum(count * operators.matmul_flops(operators.layer_ops(shape, kind, ctx))
                for kind, count in counts.items())
  forward += operators.matmul_flops(operators.head_ops(shape, ctx, with_loss=False))
  return 3.0 * forward


def _context(shape: ModelShape, plan: Plan, workload: TrainWorkload, precision: Precision,
             options: SimOptions) -> tuple[operators.OpContext, float]:
  """How one device sees a micro-batch, and the routed experts' straggler factor."""
  tokens = plan.micro_batch * workload.seq_len / plan.cp
  ctx = operators.OpContext(tokens=tokens, kv_len=workload.seq_len, cp=plan.cp, tp=plan.tp,
                            sequence_parallel=plan.sequence_parallel, ep=plan.ep, expert_tp=plan.etp,
                            activation_bytes=precision.activation_bytes,
                            weight_bytes=precision.weight_bytes, fused_attention=options.fused_attention,
                            expert_block_rows=options.expert_block_rows)
  straggler = 1.0
  if shape.moe is not None:
    group_tokens = int(round(plan.ep * tokens * plan.etp / plan.tp))  # tokens the EP group routes per micro-batch
    straggler = straggler_factor(shape.moe, plan.ep, group_tokens, samples=options.imbalance_samples)
  return ctx, straggler


def _placed_layer_cost(shape: ModelShape, kind: str, plan: Plan, ctx: operators.OpContext, placement,
                       precision: Precision, straggler: float, options: SimOptions) -> LayerCost:
  layer_plan = plan.replace(pp=1, vpp=1, dp=plan.ep, zero_stage=0, zero_shards=None, expert_zero_shards=None)
  groups = (placement["tp"], placement["etp"], placement["ep"], placement["cp"])
  return _layer_cost(shape, kind, layer_plan, ctx, groups, precision, straggler, options.op_costs, options.ep_costs)


def layer_cost(shape: ModelShape, kind: str, plan: Plan, workload: TrainWorkload, topology: Topology,
               precision: Precision = MIXED_BF16, options: SimOptions = SimOptions()) -> LayerCost:
  """One layer of `kind` ("dense" or "moe"), one micro-batch, as `simulate_training` prices it: what the
  calibration compares with a measured layer."""
  check_divisibility(shape, plan)
  ctx, straggler = _context(shape, plan, workload, precision, options)
  return _placed_layer_cost(shape, kind, plan, ctx, place(topology, plan), precision, straggler, options)


def simulate_training(shape: ModelShape, plan: Plan, workload: TrainWorkload, topology: Topology,
                      precision: Precision = MIXED_BF16, options: SimOptions = SimOptions()) -> TrainEstimate:
  """Step time, MFU and memory of `plan`; raises Infeasible with the reason for a plan that cannot run."""
  check_divisibility(shape, plan)
  n = workload.num_micro_batches(plan)
  placement = place(topology, plan)
  kinds = shape.layer_kinds()
  slots = pipeline.padded_layers(len(kinds), plan.pp, plan.vpp, options.max_noop_layers) // plan.pp
  stages = pipeline.stage_layers(kinds, plan.pp, slots)
  device, dtype, a = topology.device, precision.compute_dtype, precision.activation_bytes
  device.peak_flops(dtype)  # raises for a dtype the device lacks

  ctx, straggler = _context(shape, plan, workload, precision, options)
  tokens = ctx.tokens
  costs = {kind: _placed_layer_cost(shape, kind, plan, ctx, placement, precision, straggler, options)
           for kind in set(kinds)}
  embedding_time, head_time, head_saved = _ends_cost(shape, ctx, device, dtype, options.op_costs)
  sends = 2 * plan.vpp * communication.point_to_point(
      placement["pp"], tokens * shape.d_model * a / (plan.tp if plan.sequence_parallel else 1))

  capacity = options.memory_fraction * device.hbm_bytes
  stage_times, memories, stage_param_counts = [], [], []
  for index, stage_kinds in enumerate(stages):
    first, last = index == 0, index == plan.pp - 1
    params = stage_params(shape, stage_kinds, plan, first=first, last=last)
    in_flight = pipeline.micro_batches_in_flight(plan.pp, n, plan.vpp, stage=index)
    activations = in_flight * sum(costs[kind].saved for kind in stage_kinds) + (head_saved if last else 0.0)
    memory = training_memory(params, plan, precision, activations, capacity)
    zero_forward, zero_backward = communication.zero3_layer_seconds(
        placement, plan, params.dense / max(len(stage_kinds), 1), params.experts / max(len(stage_kinds), 1),
        precision.grad_bytes, precision.weight_bytes)
    seconds = sum(costs[kind].forward + costs[kind].backward for kind in stage_kinds)
    seconds += len(stage_kinds) * (zero_forward + zero_backward)
    seconds += (embedding_time if first else 0.0) + (head_time if last else 0.0)
    seconds += sends if plan.pp > 1 else 0.0
    stage_times.append(seconds)
    memories.append(memory)
    stage_param_counts.append(params)
  worst_memory = max(memories, key=lambda m: m.total)
  check_fits(worst_memory)
  busiest = max(range(plan.pp), key=lambda i: stage_times[i])
  stage_seconds = stage_times[busiest]

  schedule = pipeline.schedule_seconds(stage_seconds, plan.pp, n, plan.vpp)
  params = stage_param_counts[busiest]
  sync = communication.data_parallel_seconds(placement, plan, params.dense, params.experts, precision.grad_bytes,
                                             precision.weight_bytes)
  if options.overlap_grad_reduce:
    last_backward = sum(costs[kind].compute_backward for kind in stages[busiest])
    sync = max(0.0, sync - last_backward)
  local_state = params.dense / (plan.dense_shards if plan.zero_stage else 1) + params.experts / (
      plan.expert_shards if plan.zero_stage else 1)
  traffic = options.optimizer_bytes_per_param or precision.optimizer_traffic_bytes
  optimizer = local_state * traffic / (device.hbm_bandwidth * device.memory_efficiency) + device.vector_static_cost
  step = schedule + sync + optimizer + options.step_overhead

  flops = model_flops_per_sequence(shape, workload.seq_len) * workload.global_batch
  stage_kinds = stages[busiest]
  per_micro_batch = {
      "tp_traffic": sum(costs[k].tp_traffic for k in stage_kinds) * 2,
      "ep_traffic": sum(costs[k].ep_forward + costs[k].ep_backward for k in stage_kinds),
      "cp_traffic": sum(costs[k].cp_traffic for k in stage_kinds) * 2,
      "pp_sends": sends if plan.pp > 1 else 0.0,
  }
  busy = n * stage_seconds
  breakdown = {"compute_and_traffic": busy, **{k: n * v for k, v in per_micro_batch.items()},
               "bubble": schedule - busy, "dp_sync_exposed": sync, "optimizer": optimizer,
               "overhead": options.step_overhead}
  return TrainEstimate(plan=plan, step_seconds=step, tokens_per_second=workload.tokens / step,
                       mfu=flops / (plan.num_devices * device.peak_flops(dtype) * step), memory=worst_memory,
                       bubble=pipeline.bubble_fraction(plan.pp, n, plan.vpp), straggler=straggler, micro_batches=n,
                       breakdown=breakdown)
