"""What the simulator is asked: a parallel plan, a workload (training step or decode step) and the precision.

Plan conventions follow Megatron-LM / MindSpeed, which the Pangu papers use: the world is PP · DP · CP · TP
devices. By default the experts are split over TP like every other layer and expert parallelism is carved
out of the data-parallel ranks (EP divides DP), so the TP8 / PP16 / EP4 layout of Pangu Ultra MoE on 6,144
NPUs has DP = 48, of which groups of 4 hold different experts. Our own CPU mesh (`pangu.parallel.mesh`)
splits the batch over (data, fsdp, expert) in the same way. Megatron-core's expert tensor parallelism
(ETP, "MoE parallel folding") lets the expert layer use a smaller TP: with `expert_tp` < tp the remaining
tp / expert_tp TP ranks join the expert-parallel group (ours; the sources' "TP-extend-EP" may be this, but
that is unconfirmed).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pangu.config_checks import positive_ints

Recompute = Literal["none", "selective", "full"]
Dispatch = Literal["flat", "hierarchical", "ring"]
RECOMPUTES = ("none", "selective", "full")
DISPATCHES = ("flat", "hierarchical", "ring")


class Infeasible(ValueError):
  """A plan the simulator rejects, with the reason; `kind` groups reasons for search statistics."""

  def __init__(self, kind: str, reason: str):
    super().__init__(f"{kind}: {reason}")
    self.kind = kind
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one step is split over devices.

  Attributes:
    tp: tensor parallelism (Megatron): heads, FFN and expert widths and the vocab split over tp devices.
    pp: pipeline stages.
    vpp: virtual stages (model chunks) per pipeline stage: the interleaved schedule when > 1.
    cp: context parallelism: the sequence split over cp devices, keys and values exchanged in attention.
    dp: data parallelism: replicas of the dense layers, each on its own micro-batches.
    ep: expert parallelism: the routed experts are split over ep devices: tp / expert_tp TP ranks times
      ep · expert_tp / tp data-parallel ranks (which must divide dp).
    micro_batch: sequences per micro-batch on one data-parallel rank.
    sequence_parallel: with tp > 1, norms and residuals work on 1/tp of the tokens (Korthikanti et al. 2022),
      all-reduces become reduce-scatter + all-gather of the same volume.
    zero_stage: ZeRO (Rajbhandari et al. 2020): 0 replicates the training state, 1 shards the optimizer state,
      2 also the gradients, 3 also the parameters (gathered per layer and micro-batch, like FSDP).
    zero_shards: data-parallel ranks that shard one copy of the dense state; None: all dp · cp of them
      (Megatron's distributed optimizer). Our CPU mesh shards over its `fsdp` axis only.
    expert_zero_shards: the same for the routed experts, among the ranks that hold the same expert shard
      (`expert_data_group`); None: all of them.
    recompute: activations recomputed in the backward pass: `none`, `selective` (attention core and cheap
      element-wise ops, Korthikanti et al. 2022) or `full` (each layer from its input).
    ep_dispatch: `flat` all-to-all over the EP group; `hierarchical` (Pangu Ultra MoE): all-gather over the
      inter-node part, all-to-all inside the node; `ring` (our CPU path for dropless top-K): all-gather
      tokens and reduce-scatter outputs over the EP group.
    ep_overlap: hide EP communication under another micro-batch's compute (Ultra MoE's Adaptive Pipe
      Overlap): a MoE layer costs max(compute, EP comm) instead of their sum.
    expert_tp: tensor parallelism of the routed experts (Megatron-core's ETP); None: tp. Smaller values need
      sequence parallelism (each TP rank then dispatches its own tokens).
  """

  tp: int = 1
  pp: int = 1
  vpp: int = 1
  cp: int = 1
  dp: int = 1
  ep: int = 1
  micro_batch: int = 1
  sequence_parallel: bool = True
  zero_stage: int = 1
  zero_shards: int | None = None
  expert_zero_shards: int | None = None
  recompute: Recompute = "none"
  ep_dispatch: Dispatch = "flat"
  ep_overlap: bool = False
  expert_tp: int | None = None

  def __post_init__(self):
    positive_ints(self, "tp", "pp", "vpp", "cp", "dp", "ep", "micro_batch")
    if self.zero_stage not in (0, 1, 2, 3):
      raise ValueError(f"Plan.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
    if self.recompute not in RECOMPUTES:
      raise ValueError(f"Plan.recompute must be one of {RECOMPUTES}, got {self.recompute!r}")
    if self.ep_dispatch not in DISPATCHES:
      raise ValueError(f"Plan.ep_dispatch must be one of {DISPATCHES}, got {self.ep_dispatch!r}")
    if self.expert_tp is not None and (not isinstance(self.expert_tp, int) or self.expert_tp < 1
                                       or self.tp % self.expert_tp):
      raise ValueError(f"Plan.expert_tp must be a positive divisor of tp={self.tp} or None, got {self.expert_tp!r}")
    if self.etp < self.tp and not self.sequence_parallel:
      raise ValueError(f"Plan.expert_tp={self.expert_tp} < tp={self.tp} needs sequence_parallel=True")
    if self.ep % self.tp_in_ep or self.dp % self.ep_from_dp:
      raise ValueError(f"Plan.ep={self.ep} must be tp / expert_tp = {self.tp_in_ep} TP ranks times a divisor of "
                       f"dp={self.dp}")
    if self.vpp > 1 and self.pp == 1:
      raise ValueError(f"Plan.vpp={self.vpp} needs pp > 1")
    for name, group in (("zero_shards", self.data_group), ("expert_zero_shards", self.expert_data_group)):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1 or group % value):
        raise ValueError(f"Plan.{name} must be a positive divisor of its data-parallel group of {group}, "
                         f"got {value!r}")

  @property
  def num_devices(self) -> int:
    return self.pp * self.dp * self.cp * self.tp

  @property
  def etp(self) -> int:
    """Tensor parallelism of the routed experts."""
    return self.tp if self.expert_tp is None else self.expert_tp

  @property
  def tp_in_ep(self) -> int:
    """TP ranks that join the expert-parallel group (tp / expert_tp)."""
    return self.tp // self.etp

  @property
  def ep_from_dp(self) -> int:
    """Data-parallel ranks in one expert-parallel group."""
    return max(self.ep // self.tp_in_ep, 1)

  @property
  def data_group(self) -> int:
    """Ranks that hold the same dense parameters and reduce their gradients: dp · cp."""
    return self.dp * self.cp

  @property
  def expert_data_group(self) -> int:
    """Ranks that hold the same expert shard: dp · cp / (the EP group's data-parallel ranks)."""
    return self.data_group // self.ep_from_dp

  @property
  def dense_shards(self) -> int:
    return self.data_group if self.zero_shards is None else self.zero_shards

  @property
  def expert_shards(self) -> int:
    return self.expert_data_group if self.expert_zero_shards is None else self.expert_zero_shards

  def describe(self) -> str:
    """A short label, e.g. "TP8 PP16 VPP2 EP4 DP48 mb2"."""
    parts = [f"TP{self.tp}", f"PP{self.pp}"] + ([f"VPP{self.vpp}"] if self.vpp > 1 else [])
    parts += [f"EP{self.ep}"] + ([f"CP{self.cp}"] if self.cp > 1 else []) + [f"DP{self.dp}", f"mb{self.micro_batch}"]
    extras = [f"ZeRO{self.zero_stage}", f"rc={self.recompute}"]
    if self.etp != self.tp:
      extras.append(f"ETP{self.etp}")
    if self.ep > 1:
      extras.append(self.ep_dispatch + ("+overlap" if self.ep_overlap else ""))
    return " ".join(parts) + " (" + ", ".join(extras) + ")"

  def replace(self, **changes) -> Plan:
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Precision:
  """Bytes per number and the dtype whose matrix rate the compute runs at.

  Attributes:
    compute_dtype: dtype name for `DeviceSpec.peak_flops` (bf16, fp16, fp32 or int8 for W8A8).
    weight_bytes: bytes of a parameter as the matmuls read it.
    activation_bytes: bytes of an activation element.
    grad_bytes: bytes of a gradient (Megatron keeps fp32 main gradients).
    optimizer_bytes: bytes of optimizer state per parameter (fp32 master copy + Adam moments = 12 in mixed
      precision; the two moments = 8 when the parameters already are fp32).
    kv_bytes: bytes of a cached key/value element in decode.
  """

  compute_dtype: str
  weight_bytes: int
  activation_bytes: int
  grad_bytes: int
  optimizer_bytes: int
  kv_bytes: int

  def __post_init__(self):
    positive_ints(self, "weight_bytes", "activation_bytes", "grad_bytes", "optimizer_bytes", "kv_bytes")

  @property
  def optimizer_traffic_bytes(self) -> int:
    """HBM bytes one AdamW update moves per parameter: read weight, gradient and state, write weight and
    state, and two more reads of the gradient (global-norm clip and its logging)."""
    return 2 * self.weight_bytes + 3 * self.grad_bytes + 2 * self.optimizer_bytes


MIXED_BF16 = Precision("bfloat16", weight_bytes=2, activation_bytes=2, grad_bytes=4, optimizer_bytes=12, kv_bytes=2)
FP32 = Precision("float32", weight_bytes=4, activation_bytes=4, grad_bytes=4, optimizer_bytes=8, kv_bytes=4)
# Pangu Pro MoE's inference numbers are W8A8 (int8 weights and activations). The KV cache dtype is not given; we
# take int8 (ours): with a 16-bit cache the reported 800I A2 decode batch of 456 at 2K context (184 GB of cache
# for 72B-A16B) would not fit next to the weights in 4 x 64 GB.
W8A8 = Precision("int8", weight_bytes=1, activation_bytes=1, grad_bytes=1, optimizer_bytes=1, kv_bytes=1)


@dataclasses.dataclass(frozen=True)
class TrainWorkload:
  """One optimizer step: `global_batch` sequences of `seq_len` tokens."""

  seq_len: int
  global_batch: int

  def __post_init__(self):
    positive_ints(self, "seq_len", "global_batch")

  @property
  def tokens(self) -> int:
    return self.seq_len * self.global_batch

  def num_micro_batches(self, plan: Plan) -> int:
    """Micro-batches per data-parallel rank: global_batch / (dp · micro_batch); an Infeasible if uneven."""
    per_step = plan.dp * plan.micro_batch
    if self.global_batch % per_step:
      raise Infeasible("batch", f"global batch {self.global_batch} is not a multiple of dp {plan.dp} x micro-batch "
                       f"{plan.micro_batch}")
    if self.seq_len % plan.cp:
      raise Infeasible("batch", f"sequence {self.seq_len} does not split over cp={plan.cp}")
    return self.global_batch // per_step


@dataclasses.dataclass(frozen=True)
class DecodeWorkload:
  """One decode step of an inference instance: `batch` sequences each add one token after `context` cached ones."""

  batch: int
  context: int

  def __post_init__(self):
    positive_ints(self, "batch", "context")
