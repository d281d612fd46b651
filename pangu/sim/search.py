"""Search: enumerate feasible plans (and model shapes in a space), rank them, keep the rejection reasons.

Training (Pangu Ultra MoE, secondary: a 5-D search over PP with VPP, TP, EP, DP and CP, memory checked
against capacity): every factorisation of the devices into PP · DP · CP · TP with EP dividing DP, times the
virtual stages, micro-batch sizes, recomputation, dispatch and overlap choices of a `PlanSpace`. Plans rank by
step time, which for a fixed model and global batch also ranks MFU and tokens per second.

Decode (Pangu Pro MoE §2.3, confirmed): the highest per-device throughput under a TPOT limit, over instance
layouts (TP, attention DP, EP) and batch sizes; `MoEShapeSpace` enumerates the paper's shape space for its
model search.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator

from pangu.nn.moe.config import MoEConfig
from pangu.parallel.topology import Topology
from pangu.sim.decode import DecodeEstimate, simulate_decode
from pangu.sim.plan import MIXED_BF16, W8A8, DecodeWorkload, Infeasible, Plan, Precision, TrainWorkload
from pangu.sim.shapes import GQA, ModelShape
from pangu.sim.training import SimOptions, simulate_training


@dataclasses.dataclass(frozen=True)
class PlanSpace:
  """The values each plan dimension may take; DP follows from the device count.

  `ep_overlap` defaults to on: overlap never makes a plan slower in the model, so searching both halves only
  duplicates the ranking (pass (False, True) to compare). `expert_tp` None keeps the experts split over TP;
  1 folds the TP ranks into expert parallelism (Megatron-core's ETP).
  """

  tp: tuple[int, ...] = (1, 2, 4, 8)
  pp: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
  vpp: tuple[int, ...] = (1, 2, 4)
  ep: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
  cp: tuple[int, ...] = (1, 2)
  micro_batch: tuple[int, ...] = (1, 2, 4)
  recompute: tuple[str, ...] = ("none", "selective", "full")
  ep_dispatch: tuple[str, ...] = ("flat", "hierarchical")
  ep_overlap: tuple[bool, ...] = (True,)
  zero_stage: tuple[int, ...] = (1,)
  expert_tp: tuple[int | None, ...] = (None, 1)

  def plans(self, devices: int) -> Iterator[Plan]:
    """Every combination that multiplies to `devices` and passes `Plan` validation."""
    for tp, pp, cp in itertools.product(self.tp, self.pp, self.cp):
      dp, remainder = divmod(devices, tp * pp * cp)
      if remainder:
        continue
      for vpp, ep, etp, mb, recompute, zero in itertools.product(self.vpp, self.ep, self.expert_tp, self.micro_batch,
                                                                 self.recompute, self.zero_stage):
        etp = tp if etp is None else etp
        if (vpp > 1 and pp == 1) or (etp != tp and (tp % etp or ep == 1)):
          continue
        tp_in_ep = tp // etp
        if ep % tp_in_ep or dp % (ep // tp_in_ep):
          continue
        for dispatch, overlap in itertools.product(self.ep_dispatch if ep > 1 else ("flat",),
                                                   self.ep_overlap if ep > 1 else (False,)):
          yield Plan(tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp, ep=ep, micro_batch=mb, zero_stage=zero,
                     recompute=recompute, ep_dispatch=dispatch, ep_overlap=overlap,
                     expert_tp=None if etp == tp else etp)


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """Ranked feasible plans (best first) and what was rejected.

  Attributes:
    ranked: feasible estimates, best first.
    evaluated: plans tried.
    rejected: rejections per reason kind ("memory", "divisibility", "layers", "placement", "batch").
    examples: one rejection message per kind.
    seconds: wall time of the search.
  """

  ranked: list
  evaluated: int
  rejected: dict[str, int]
  examples: dict[str, str]
  seconds: float


def _rank(candidates: Iterator, evaluate: Callable, key: Callable) -> SearchResult:
  start = time.perf_counter()
  ranked, rejected, examples, evaluated = [], collections.Counter(), {}, 0
  for candidate in candidates:
    evaluated += 1
    try:
      estimate = evaluate(candidate)
    except Infeasible as error:
      rejected[error.kind] += 1
      examples.setdefault(error.kind, error.reason)
      continue
    if estimate is not None:
      ranked.append(estimate)
  ranked.sort(key=key)
  return SearchResult(ranked=ranked, evaluated=evaluated, rejected=dict(rejected), examples=examples,
                      seconds=time.perf_counter() - start)


def search_training(shape: ModelShape, topology: Topology, workload: TrainWorkload, space: PlanSpace = PlanSpace(),
                    precision: Precision = MIXED_BF16, options: SimOptions = SimOptions()) -> SearchResult:
  """Every feasible plan of `space` on `topology`, fastest step first (= highest MFU and tokens/s)."""
  return _rank(space.plans(topology.num_devices),
               lambda plan: simulate_training(shape, plan, workload, topology, precision, options),
               key=lambda estimate: estimate.step_seconds)


def decode_layouts(devices: int, shape: ModelShape) -> Iterator[Plan]:
  """Instance layouts of `devices` devices: TP x attention DP, EP dividing DP."""
  for tp in (d for d in range(1, devices + 1) if devices % d == 0):
    dp = devices // tp
    for ep in (e for e in range(1, dp + 1) if dp % e == 0):
      if ep > 1 and shape.moe is None:
        continue
      yield Plan(tp=tp, dp=dp, ep=ep, sequence_parallel=False, zero_stage=0)


def best_decode(shape: ModelShape, topology: Topology, tpot_limit: float, context: int,
                precision: Precision = W8A8, options: SimOptions = SimOptions(),
                max_batch: int = 4096) -> DecodeEstimate | None:
  """The layout and batch with the highest tokens/s per device at TPOT <= `tpot_limit` (None if none fits).

  TPOT grows with the batch, so each layout's largest batch under the limit is found by bisection.
  """
  best = None
  for plan in decode_layouts(topology.num_devices, shape):
    def feasible(batch: int) -> DecodeEstimate | None:
      try:
        estimate = simulate_decode(shape, plan, DecodeWorkload(batch=batch * plan.dp, context=context), topology,
                                   precision, options)
      except Infeasible:
        return None
      return estimate if estimate.tpot_seconds <= tpot_limit else None

    low, high = 0, max_batch // plan.dp
    while low < high:  # largest per-group batch that is feasible
      middle = (low + high + 1) // 2
      if feasible(middle) is None:
        high = middle - 1
      else:
        low = middle
    estimate = feasible(low) if low else None
    if estimate is not None and (best is None or
                                 estimate.tokens_per_second_per_device > best.tokens_per_second_per_device):
      best = estimate
  return best


@dataclasses.dataclass(frozen=True)
class MoEShapeSpace:
  """Pangu Pro MoE's model search space (§2.3, confirmed ranges): hidden 4096–8192, query heads 32–64, KV heads
  8–16, layers 40–64, routed experts 32–64, 60–80B total parameters. Fixed from the published model (ours):
  head dim 128, MoGE with 8 groups and K = 8, 4 shared experts of the routed width, its vocab.
  """

  hidden: tuple[int, ...] = (4096, 5120, 6144, 7168, 8192)
  heads: tuple[int, ...] = (32, 40, 48, 64)
  kv_heads: tuple[int, ...] = (8, 16)
  layers: tuple[int, ...] = (40, 48, 56, 64)
  experts: tuple[int, ...] = (32, 48, 64)
  expert_dim: tuple[int, ...] = (1024, 1344, 1792, 2048)
  total_params: tuple[float, float] = (60e9, 80e9)
  head_dim: int = 128
  groups: int = 8
  top_k: int = 8
  shared_experts: int = 4
  vocab_size: int = 153_376

  def shapes(self) -> Iterator[ModelShape]:
    for d, h, k, layers, n, f in itertools.product(self.hidden, self.heads, self.kv_heads, self.layers,
                                                   self.experts, self.expert_dim):
      if h % k:
        continue
      moe = MoEConfig(num_experts=n, top_k=self.top_k, expert_dim=f, router="moge", num_groups=self.groups,
                      num_shared_experts=self.shared_experts)
      shape = ModelShape(name=f"d{d}_h{h}_kv{k}_l{layers}_e{n}_f{f}", vocab_size=self.vocab_size, d_model=d,
                         n_layers=layers, attention=GQA(h, k, self.head_dim, bias=True), d_ff=self.top_k * f, moe=moe)
      if self.total_params[0] <= shape.param_count() <= self.total_params[1]:
        yield shape


def search_decode_shapes(shapes: Iterator[ModelShape], topology: Topology, tpot_limit: float, context: int,
                         precision: Precision = W8A8, options: SimOptions = SimOptions()) -> SearchResult:
  """Each shape's best decode layout under the TPOT limit, highest tokens/s per device first."""
  return _rank(shapes, lambda shape: best_decode(shape, topology, tpot_limit, context, precision, options),
               key=lambda estimate: -estimate.tokens_per_second_per_device)
