"""Operator inventory of one micro-batch on one device: FLOPs, HBM bytes and saved activations per operator.

The bottom-up model of the Pangu simulators (Pangu Pro MoE §2.3; Pangu Ultra MoE, secondary) in the form of
Ascend's msmodeling: an operator takes

    max(FLOPs / (peak · compute_efficiency), bytes / (HBM bandwidth · memory_efficiency)) + static cost

with matrix ops at the dtype's matrix rate and element-wise ops at the vector rate. Backward costs twice the
forward (input and weight gradients; the standard 2x, ours). Where an operator family was profiled (on CPU,
`calibrate.py`) its measured forward scale and backward / forward ratio replace these (`FamilyCost`).
Collectives are priced in `communication.py`.

Per device and micro-batch: t tokens (micro_batch · seq / cp), S key positions each query attends to,
heads and FFN widths divided by tp, norms on t / tp tokens under sequence parallelism.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from pangu.config_checks import positive_numbers
from pangu.parallel.topology import DeviceSpec
from pangu.sim.imbalance import expected_distinct_experts
from pangu.sim.shapes import GQA, MLA, ModelShape

OpKind = Literal["matmul", "vector"]
# Operator families whose measured cost may differ from the roofline, one library module each (calibrated on
# CPU by profiling it): the dense FFN, norms, residuals and embedding; the attention block (its norm,
# projections, RoPE and core); the MoE feed-forward (router, permutation, routed and shared experts); the
# output head (final norm, vocab projection, cross-entropy).
FAMILIES = ("dense", "attention", "experts", "head")
FLOAT32_BYTES = 4
# Element-wise FLOPs per element of a norm, softmax or SwiGLU gate (a rough constant; these ops are
# memory-bound at every realistic shape, so it rarely matters).
VECTOR_FLOPS_PER_ELEMENT = 8


@dataclasses.dataclass(frozen=True)
class Op:
  """One operator of the forward pass.

  Attributes:
    name: label for breakdowns.
    kind: `matmul` (matrix unit) or `vector`.
    flops: floating-point operations.
    bytes: HBM bytes read plus written.
    weights: the part of `bytes` that is weights (what decode streams every step).
    saved: activation bytes the backward pass needs from this op.
    selective: whether selective recomputation drops `saved` and recomputes the op in the backward pass.
    routed: work of the routed experts, which follows the most loaded expert-parallel device.
    launches: kernels the op runs as (static costs); a blocked grouped matmul runs one per block.
    family: one of `FAMILIES`, for measured per-family costs.
  """

  name: str
  kind: OpKind
  flops: float
  bytes: float
  weights: float = 0.0
  saved: float = 0.0
  selective: bool = False
  routed: bool = False
  launches: int = 1
  family: str = "dense"


@dataclasses.dataclass(frozen=True)
class FamilyCost:
  """How an operator family's measured time relates to the roofline model.

  Attributes:
    forward_scale: measured forward time / modelled forward time (1: the roofline holds).
    backward_factor: backward time / forward time (2: the input and weight gradients' FLOPs, the standard).
    saved_passes: passes over the op's saved activations, at the memory roofline, that its backward pass
      adds beyond `backward_factor`: what scales with the activations rather than the FLOPs. On CPU our layer
      scan stacks every saved activation in the forward pass and slices it back in the backward pass, and
      XLA transposes activations and gradients for the weight gradients; this is what makes the backward of
      narrow layers (many tokens per FLOP) costlier than that of wide ones. 0: not measured (presets).
  """

  forward_scale: float = 1.0
  backward_factor: float = 2.0
  saved_passes: float = 0.0

  def __post_init__(self):
    positive_numbers(self, "forward_scale", "backward_factor")
    if not self.saved_passes >= 0:
      raise ValueError(f"FamilyCost.saved_passes must be >= 0, got {self.saved_passes}")


Costs = dict[str, FamilyCost]


@dataclasses.dataclass(frozen=True)
class OpContext:
  """How one device sees a micro-batch.

  Attributes:
    tokens: t, tokens this device processes per micro-batch.
    kv_len: S, key positions each query attends to (the sequence in training, the cache in decode).
    cp: context-parallel degree (a device's queries attend to the keys of cp devices).
    tp: tensor-parallel degree.
    sequence_parallel: norms and residuals on t / tp tokens.
    ep: expert-parallel degree.
    expert_tp: tensor parallelism of the routed experts; None: tp.
    activation_bytes, weight_bytes, kv_bytes: bytes per element (kv_bytes: the decode cache).
    fused_attention: FlashAttention-style core: no S x S scores in HBM, masked causal blocks skipped.
    decode: the queries are new tokens after a cache (MLA then runs its absorbed form on the latent cache).
    expert_block_rows: None for a grouped-matmul kernel; for our CPU `blocked` experts, the block rule's upper
      bound (each expert's rows pad to whole blocks, one kernel launch per block and projection).
  """

  tokens: float
  kv_len: int
  cp: int = 1
  tp: int = 1
  sequence_parallel: bool = False
  ep: int = 1
  expert_tp: int | None = None
  activation_bytes: int = 2
  weight_bytes: int = 2
  kv_bytes: int = 2
  fused_attention: bool = True
  decode: bool = False
  expert_block_rows: int | None = None

  @property
  def etp(self) -> int:
    return self.tp if self.expert_tp is None else self.expert_tp

  @property
  def key_tokens(self) -> float:
    """Key positions read per micro-batch: each decoded token's own cache, or the sequences' keys."""
    return self.tokens * self.kv_len if self.decode else self.tokens * self.cp

  @property
  def norm_tokens(self) -> float:
    return self.tokens / self.tp if self.sequence_parallel and self.tp > 1 else self.tokens


def roofline_seconds(op: Op, device: DeviceSpec, dtype: str) -> float:
  """max(FLOPs / compute rate, bytes / memory rate): matrix ops at the dtype's matrix rate, others at the
  vector rate."""
  rate = device.peak_flops(dtype) if op.kind == "matmul" else device.vector_flops
  memory = op.bytes / (device.hbm_bandwidth * device.memory_efficiency)
  return max(op.flops / (rate * device.compute_efficiency), memory)


def static_seconds(op: Op, device: DeviceSpec, *, backward: bool = False) -> float:
  """Launch costs: one per kernel, two per matmul kernel in the backward pass (input and weight gradients)."""
  static = device.matmul_static_cost if op.kind == "matmul" else device.vector_static_cost
  return static * op.launches * (2 if backward and op.kind == "matmul" else 1)


def saved_traffic_seconds(op: Op, device: DeviceSpec) -> float:
  """One pass over the op's saved activations at the memory roofline."""
  return op.saved / (device.hbm_bandwidth * device.memory_efficiency)


def op_seconds(op: Op, device: DeviceSpec, dtype: str, cost: FamilyCost = FamilyCost(), *,
               backward: bool = False) -> float:
  """Roofline time of an op plus its static launch cost, scaled by its family's measured cost.

  The backward pass takes `cost.backward_factor` times the forward's roofline time, two launches per matmul
  (input and weight gradients) and `cost.saved_passes` passes over the op's saved activations.
  """
  seconds = cost.forward_scale * ((cost.backward_factor if backward else 1.0) * roofline_seconds(op, device, dtype)
                                  + static_seconds(op, device, backward=backward))
  return seconds + (cost.saved_passes * saved_traffic_seconds(op, device) if backward else 0.0)


def _matmul(name: str, ctx: OpContext, rows: float, d_in: float, d_out: float, *, saved_input: bool = True,
            routed: bool = False, weights: float | None = None, launches: int = 1) -> Op:
  """rows x d_in @ d_in x d_out; `weights` overrides the weight elements read (grouped experts)."""
  a, w = ctx.activation_bytes, ctx.weight_bytes
  weight_bytes = w * (d_in * d_out if weights is None else weights)
  return Op(name, "matmul", 2.0 * rows * d_in * d_out, a * rows * (d_in + d_out) + weight_bytes,
            weights=weight_bytes, saved=a * rows * d_in if saved_input else 0.0, routed=routed, launches=launches)


def _vector(name: str, elements: float, element_bytes: float, *, passes: float = 2.0, saved: float = 0.0,
            selective: bool = False, routed: bool = False) -> Op:
  """An element-wise op touching `elements` values `passes` times (a read and a write by default)."""
  return Op(name, "vector", VECTOR_FLOPS_PER_ELEMENT * elements, passes * elements * element_bytes, saved=saved,
            selective=selective, routed=routed)


def _heads(count: int, tp: int) -> float:
  """Heads per device; Megatron replicates kv heads when there are fewer than tp."""
  return count / tp if count >= tp else count


def norm_op(name: str, ctx: OpContext, d: int) -> Op:
  """An RMSNorm over the device's tokens (1 / tp of them under sequence parallelism)."""
  elements = ctx.norm_tokens * d
  return _vector(name, elements, ctx.activation_bytes, saved=ctx.activation_bytes * elements)


def attention_core_ops(ctx: OpContext, heads: float, qk_dim: int, v_dim: int, kv_width: float) -> list[Op]:
  """softmax(Q K^T) V for t queries over S keys each; `kv_width` numbers per key position are read."""
  t, s, a = ctx.tokens, ctx.kv_len, ctx.activation_bytes
  kv_element_bytes = ctx.kv_bytes if ctx.decode else a
  qkv_bytes = a * t * heads * qk_dim + kv_element_bytes * ctx.key_tokens * kv_width
  out_elements = t * heads * v_dim
  if ctx.fused_attention:
    causal = 0.5 if not ctx.decode else 1.0  # masked blocks of a causal prefill/training step are skipped
    flops = causal * 2.0 * t * s * heads * (qk_dim + v_dim)
    saved = qkv_bytes + a * out_elements + FLOAT32_BYTES * t * heads  # inputs, output, softmax statistics
    return [Op("attention_core", "matmul", flops, qkv_bytes + a * out_elements, saved=saved)]
  scores = t * s * heads
  return [
      Op("attention_scores", "matmul", 2.0 * scores * qk_dim, qkv_bytes + FLOAT32_BYTES * scores, saved=qkv_bytes),
      _vector("softmax", scores, FLOAT32_BYTES, passes=3, saved=FLOAT32_BYTES * scores, selective=True),
      Op("attention_values", "matmul", 2.0 * scores * v_dim, FLOAT32_BYTES * scores + a * out_elements),
  ]


def attention_ops(shape: ModelShape, ctx: OpContext) -> list[Op]:
  """Norm, projections, RoPE and the attention core of one layer (GQA or MLA), all of the `attention` family."""
  return [dataclasses.replace(op, family="attention") for op in _attention_block_ops(shape, ctx)]


def _attention_block_ops(shape: ModelShape, ctx: OpContext) -> list[Op]:
  d, attn, t, a = shape.d_model, shape.attention, ctx.tokens, ctx.activation_bytes
  heads = _heads(attn.n_heads, ctx.tp)
  ops = [norm_op("attention_norm", ctx, d)]
  if isinstance(attn, GQA):
    kv_heads = _heads(attn.n_kv_heads, ctx.tp)
    dh = attn.head_dim
    ops += [_matmul("qkv_projection", ctx, t, d, (heads + 2 * kv_heads) * dh),
            _vector("rope", t * (heads + kv_heads) * dh, a)]
    ops += attention_core_ops(ctx, heads, dh, dh, kv_heads * 2 * dh)
    ops.append(_matmul("output_projection", ctx, t, heads * dh, d))
    return ops
  assert isinstance(attn, MLA)
  qk_dim = attn.qk_nope_dim + attn.qk_rope_dim
  ops += [_matmul("q_down", ctx, t, d, attn.q_lora_rank),
          _vector("q_latent_norm", t * attn.q_lora_rank, a, saved=a * t * attn.q_lora_rank),
          _matmul("q_up", ctx, t, attn.q_lora_rank, heads * qk_dim),
          _matmul("kv_down", ctx, t, d, attn.kv_lora_rank + attn.qk_rope_dim),
          _vector("kv_latent_norm", t * attn.kv_lora_rank, a, saved=a * t * attn.kv_lora_rank),
          _matmul("kv_up", ctx, t, attn.kv_lora_rank, heads * (attn.qk_nope_dim + attn.v_head_dim)),
          _vector("rope", t * (heads + 1) * attn.qk_rope_dim, a)]
  if ctx.decode:  # absorbed MLA: every head attends over the shared latent cache (kv_lora + rope per position)
    latent = attn.kv_lora_rank + attn.qk_rope_dim
    ops += attention_core_ops(ctx, heads, latent, attn.kv_lora_rank, latent)
  else:
    ops += attention_core_ops(ctx, heads, qk_dim, attn.v_head_dim, heads * (qk_dim + attn.v_head_dim))
  ops.append(_matmul("output_projection", ctx, t, heads * attn.v_head_dim, d))
  return ops


def swiglu_ops(name: str, ctx: OpContext, d: int, width: int) -> list[Op]:
  """gate and up projections, silu(gate) * up, down projection; width already split over tp."""
  t, a = ctx.tokens, ctx.activation_bytes
  return [_matmul(f"{name}_gate_up", ctx, t, d, 2 * width),
          _vector(f"{name}_swiglu", t * width, a, passes=3, saved=2 * a * t * width),
          dataclasses.replace(_matmul(f"{name}_down", ctx, t, width, d), selective=True)]


def _grouped_expert_launches(ctx: OpContext, rows: float, local_experts: int) -> tuple[float, int]:
  """Rows and kernel launches of the routed experts on one device.

  A grouped-matmul kernel runs each projection once. Our CPU `blocked` experts pad every expert's rows to a
  block of a power of two near the mean group size (at most `expert_block_rows`): half a block of padding
  per expert on average, one launch per block.
  """
  if ctx.expert_block_rows is None:
    return rows, 3
  mean = max(int(rows // local_experts), 8)
  block = min(ctx.expert_block_rows, 1 << (mean.bit_length() - 1))
  padded = rows + local_experts * block / 2
  return padded, 3 * int(-(-padded // block))


def dispatch_rows(shape: ModelShape, ep: int) -> float:
  """Rows one token sends in a flat EP dispatch: one per device under MoGE with whole groups per device (K / P
  experts in each row, our fixed exchange), otherwise one per assignment (K)."""
  moe = shape.moe
  if moe.router == "moge" and moe.num_groups % ep == 0:
    return float(ep)
  return float(moe.top_k)


def moe_ops(shape: ModelShape, ctx: OpContext, exchange: str = "flat") -> list[Op]:
  """Router, permutation, routed experts, unpermutation and shared experts of one MoE layer (`experts` family).

  The routed experts see t · K · etp / tp rows of width F / etp on an average device (t · K when they split
  over TP like the other layers) and read the weights of the local experts that at least one of the EP
  group's tokens picked. The permutation gathers the rows a device sends (`dispatch_rows` per token) and
  sorts the assignments it receives; under the `ring` exchange (all-gather, then reduce-scatter) a device
  sorts and scatters every assignment of the EP group, ep times its own.
  """
  moe, d, t, a = shape.moe, shape.d_model, ctx.tokens, ctx.activation_bytes
  width = moe.expert_dim / ctx.etp
  local_experts = moe.num_experts // ctx.ep
  assignments = t * moe.top_k * ctx.etp / ctx.tp
  touched = expected_distinct_experts(moe.num_experts, moe.top_k, int(math.ceil(ctx.ep * assignments / moe.top_k)))
  touched /= ctx.ep
  rows, launches = _grouped_expert_launches(ctx, assignments, local_experts)
  sent = ctx.norm_tokens * dispatch_rows(shape, ctx.ep)  # under SP a TP rank dispatches only its share
  sorted_rows = (ctx.ep if exchange == "ring" else 1) * assignments
  moved = (sent + sorted_rows) * d
  ops = [
      Op("router", "matmul", 2.0 * t * d * moe.num_experts, a * t * d + FLOAT32_BYTES * (d + t) * moe.num_experts,
         weights=FLOAT32_BYTES * d * moe.num_experts, saved=a * t * d),
      _vector("routing", t * moe.num_experts, FLOAT32_BYTES, passes=3),
      # The experts' input rows are saved here: permute recomputation (named in Pro MoE) drops them under
      # selective recomputation and gathers them again in the backward pass.
      _vector("permute", moved, a, routed=True, saved=a * rows * d, selective=True),
      Op("routed_experts", "matmul", 6.0 * rows * d * width,
         a * rows * (2 * d + 3 * width) + ctx.weight_bytes * 3 * d * width * touched,
         weights=ctx.weight_bytes * 3 * d * width * touched, saved=a * rows * 3 * width, routed=True,
         launches=launches),
      _vector("unpermute", moved, a, routed=True, saved=a * sent * d, selective=True),
  ] + (swiglu_ops("shared_expert", ctx, d, moe.shared_dim / ctx.tp) if moe.shared_dim else [])
  return [dataclasses.replace(op, family="experts") for op in ops]


def layer_ops(shape: ModelShape, kind: str, ctx: OpContext, exchange: str = "flat") -> list[Op]:
  """One decoder layer of `kind` ("dense" or "moe"), residual adds and sandwich post-norms included."""
  d = shape.d_model
  ops = attention_ops(shape, ctx)
  ops.append(norm_op("ffn_norm", ctx, d))
  if kind == "dense":
    ops += swiglu_ops("ffn", ctx, d, shape.d_ff / ctx.tp)
  else:
    ops += moe_ops(shape, ctx, exchange)
  post_norms = shape.norms_per_layer - 2
  ops.append(_vector("residual_and_post_norms", ctx.norm_tokens * d * (2 + post_norms), ctx.activation_bytes,
                     passes=3, saved=ctx.activation_bytes * ctx.norm_tokens * d * post_norms))
  return ops


def embedding_ops(shape: ModelShape, ctx: OpContext) -> list[Op]:
  """The token embedding lookup (a gather)."""
  return [_vector("embedding", ctx.norm_tokens * shape.d_model, ctx.activation_bytes)]


def head_ops(shape: ModelShape, ctx: OpContext, *, with_loss: bool = True) -> list[Op]:
  """Final norm, the vocab projection (split over tp) and the cross-entropy on float32 logits, once for the
  main head and once per MTP module (whose 2D -> D projection is charged here too)."""
  d, t = shape.d_model, ctx.tokens
  vocab = shape.vocab_size / ctx.tp
  one = [norm_op("final_norm", ctx, d), _matmul("lm_head", ctx, t, d, vocab)]
  if with_loss:
    one.append(_vector("cross_entropy", t * vocab, FLOAT32_BYTES, passes=4, saved=FLOAT32_BYTES * t * vocab))
  mtp = [_matmul("mtp_projection", ctx, t, 2 * d, d)] if shape.mtp_layers else []
  return [dataclasses.replace(op, family="head") for op in one + (mtp + one) * shape.mtp_layers]


def forward_seconds(ops: list[Op], device: DeviceSpec, dtype: str, costs: Costs | None = None, *,
                    routed_factor: float = 1.0, backward: bool = False) -> float:
  """Sum of op times (of their backward passes with `backward`), each scaled by its family's measured cost;
  routed-expert ops follow the most loaded device (`routed_factor` >= 1)."""
  costs = costs or {}
  total = 0.0
  for op in ops:
    seconds = op_seconds(op, device, dtype, costs.get(op.family, FamilyCost()), backward=backward)
    total += seconds * (routed_factor if op.routed else 1.0)
  return total


def recompute_seconds(ops: list[Op], device: DeviceSpec, dtype: str, recompute: str, costs: Costs | None = None, *,
                      routed_factor: float = 1.0) -> float:
  """Forward work repeated in the backward pass: none, the `selective` ops, or the whole layer (`full`)."""
  if recompute == "none":
    return 0.0
  chosen = ops if recompute == "full" else [op for op in ops if op.selective]
  return forward_seconds(chosen, device, dtype, costs, routed_factor=routed_factor)


def saved_bytes(ops: list[Op], recompute: str, layer_input_bytes: float) -> float:
  """Activation bytes one layer keeps for the backward pass under a recomputation choice."""
  if recompute == "full":
    return layer_input_bytes
  return sum(op.saved for op in ops if not (recompute == "selective" and op.selective))


def matmul_flops(ops: list[Op]) -> float:
  return sum(op.flops for op in ops if op.kind == "matmul")
