"""FlashAttention-2 forward and backward as Pallas kernels, each block's mask built from its own positions.

Layout: q [B, S, H, Dh]; k, v [B, T, K, Dh], or [B, K, T, Dh] (`Spec.kv_heads_major`, the KV cache's layout, read
in place). Query head h reads kv head h // G (G = H / K) through the BlockSpec index maps, so GQA never repeats
K / V. S and T are padded here to whole blocks: padded keys get position -1 (never seen), padded queries repeat
the last query and are sliced off.

Mask: kv_lengths are folded into the key positions first (slot >= length -> position -1); then each program
loads the positions (and segment ids) of its q block and, per kv block, of those keys, and builds that
[bq, bk] mask itself (`visible`). Nothing [S, T]-sized exists. Which kv blocks a q block can see at all is
decided before the kernels from per-block summaries (min / max position and segment id of each block: O(S / bq
x T / bk) work on [B, S / bq, T / bk] booleans), and each program loops only over the range from its first to
its last visible block: causal attention does about half the blocks, a window O(S x window) work, and packed
sequences skip the other documents. A block inside the range that is masked whole is computed and masked,
which costs time, never correctness.

Forward (one program per batch row, query head and q block): the online softmax over the range in float32,
scores masked to MASKED, writing out and lse = m + log(l) per query. Backward (FlashAttention-2, Alg. 2): with
delta = rowsum(dout * out) - dlse (one XLA reduction), each block's p = exp(s - lse) is recomputed; one kernel
per q block accumulates dq over its kv blocks, one per kv block and kv head accumulates dk and dv over every
query head of its group. No atomics, no [S, T] buffer.

A query that sees no key ends with m == MASKED: the kernel writes lse = +inf for it (so its p is 0 in the
backward) and `flash_attention` replaces its row by the mean of the values (reference.py's rule) in plain JAX,
which also differentiates that mean.

The kernels use only 2-D loads, dots, elementwise math and fori_loops, so they compile with the Triton lowering
(GPU; api.py checks its power-of-two shapes) and run anywhere with interpret=True.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pangu_kernels.attention.reference import MaskArrays, Spec

# Masked scores: below any real score, so exp(MASKED - m) == 0 once a row has seen a key, yet finite, so that a
# row which has seen only masked keys so far keeps exp(MASKED - MASKED) == 1 and no NaN.
MASKED = -0.7 * float(np.finfo(np.float32).max)
_INT_MAX = int(np.iinfo(np.int32).max)
# Triton's dot needs every dimension >= 16; blocks are never fitted below it.
MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles (queries x keys) of the forward kernel and of the two backward kernels.

  The backward holds three accumulators and recomputes p, hence its smaller default tiles. The defaults are the
  Triton FlashAttention tutorial's, untuned here; on GPU every size must be a power of two >= 16.
  """

  block_q: int = 128
  block_k: int = 64
  block_q_backward: int = 64
  block_k_backward: int = 64

  def __post_init__(self):
    for name, value in dataclasses.asdict(self).items():
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

  def fitted(self, q_len: int, kv_len: int) -> "BlockSizes":
    """No tile larger than its sequence rounded up to a power of two (>= MIN_BLOCK): short inputs pad little."""
    q_cap, kv_cap = (max(MIN_BLOCK, pl.next_power_of_2(n)) for n in (q_len, kv_len))
    return BlockSizes(min(self.block_q, q_cap), min(self.block_k, kv_cap), min(self.block_q_backward, q_cap),
                      min(self.block_k_backward, kv_cap))


class BlockMask(NamedTuple):
  """A mask as the kernels read it: int32 positions with the lengths folded in (negative: never seen), and the
  segment ids (both or None)."""

  q_positions: jax.Array  # [B, S]
  kv_positions: jax.Array  # [B, T]
  q_segment_ids: jax.Array | None
  kv_segment_ids: jax.Array | None


def block_mask(mask: MaskArrays, batch: int, q_len: int, kv_len: int) -> BlockMask:
  """`mask` with default positions filled in, every array [B, ...] int32, and slots >= kv_lengths at -1."""
  q_pos = jnp.arange(q_len) if mask.q_positions is None else mask.q_positions
  kv_pos = jnp.arange(kv_len) if mask.kv_positions is None else mask.kv_positions
  kv_pos = jnp.broadcast_to(kv_pos, (batch, kv_len)).astype(jnp.int32)
  if mask.kv_lengths is not None:
    kv_pos = jnp.where(jnp.arange(kv_len)[None] < mask.kv_lengths[:, None], kv_pos, -1)
  segments = [None if ids is None else ids.astype(jnp.int32) for ids in (mask.q_segment_ids, mask.kv_segment_ids)]
  return BlockMask(jnp.broadcast_to(q_pos, (batch, q_len)).astype(jnp.int32), kv_pos, *segments)


def pad_axis(x: jax.Array, axis: int, size: int, **kwargs) -> jax.Array:
  """x padded at the end of `axis` to `size` (jnp.pad's mode and constant_values in kwargs)."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, **kwargs)


def pad_mask(mask: BlockMask, q_len: int, kv_len: int) -> BlockMask:
  """Padded queries repeat the last one (no block summary changes), padded keys get position -1."""
  pad_q = lambda ids: None if ids is None else pad_axis(ids, 1, q_len, mode="edge")
  pad_kv = lambda ids: None if ids is None else pad_axis(ids, 1, kv_len, constant_values=-1)
  return BlockMask(pad_q(mask.q_positions), pad_kv(mask.kv_positions), pad_q(mask.q_segment_ids),
                   pad_kv(mask.kv_segment_ids))


def visible(q_pos: jax.Array, kv_pos: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
            spec: Spec) -> jax.Array:
  """Which of the keys [C] each query [R] sees (bool [R, C] or [1, C]): the rule of reference.py."""
  q_pos, kv_pos = q_pos[:, None], kv_pos[None, :]
  seen = kv_pos >= 0
  if spec.causal:
    seen = seen & (kv_pos <= q_pos)
  if spec.window is not None:
    seen = seen & (jnp.abs(q_pos - kv_pos) < spec.window)
  if q_seg is not None:
    seen = seen & (q_seg[:, None] == kv_seg[None, :])
  return seen


def _block_range(values: jax.Array, valid: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """min and max [B, n] of the valid entries of each block of `block` columns; (INT_MAX, -INT_MAX) for none."""
  shape = (values.shape[0], values.shape[1] // block, block)
  values, valid = values.reshape(shape), valid.reshape(shape)
  return jnp.min(jnp.where(valid, values, _INT_MAX), -1), jnp.max(jnp.where(valid, values, -_INT_MAX), -1)


def visible_blocks(mask: BlockMask, spec: Spec, block_q: int, block_k: int) -> jax.Array:
  """bool [B, S / block_q, T / block_k]: False where no query of the q block can see a key of the kv block."""
  every_query = jnp.ones_like(mask.q_positions, bool)
  kv_valid = mask.kv_positions >= 0
  q_lo, q_hi = (x[:, :, None] for x in _block_range(mask.q_positions, every_query, block_q))
  kv_lo, kv_hi = (x[:, None, :] for x in _block_range(mask.kv_positions, kv_valid, block_k))
  seen = kv_lo <= kv_hi  # the block holds a valid key
  if spec.causal:
    seen = seen & (kv_lo <= q_hi)
  if spec.window is not None:
    seen = seen & (kv_hi > q_lo - spec.window) & (kv_lo < q_hi + spec.window)
  if mask.q_segment_ids is not None:
    q_seg_lo, q_seg_hi = (x[:, :, None] for x in _block_range(mask.q_segment_ids, every_query, block_q))
    kv_seg_lo, kv_seg_hi = (x[:, None, :] for x in _block_range(mask.kv_segment_ids, kv_valid, block_k))
    seen = seen & (kv_seg_lo <= q_seg_hi) & (kv_seg_hi >= q_seg_lo)
  return jnp.broadcast_to(seen, (q_lo.shape[0], q_lo.shape[1], kv_lo.shape[2]))


def block_span(seen: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """int32 (first, one past the last) index of a True along `axis` of `seen`; (0, 0) where there is none."""
  any_seen = jnp.any(seen, axis)
  first = jnp.argmax(seen, axis)
  last = seen.shape[axis] - jnp.argmax(jnp.flip(seen, axis), axis)
  return jnp.where(any_seen, first, 0).astype(jnp.int32), jnp.where(any_seen, last, 0).astype(jnp.int32)


def _dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """a @ b of 2-D tiles (either transposed in the contraction, which Triton does for free), float32."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _scores(q: jax.Array, k: jax.Array, spec: Spec) -> tuple[jax.Array, jax.Array | None]:
  """float32 scores q k^T / sqrt(Dh), soft-capped, and tanh(s / cap) for the backward (None without a cap)."""
  s = _dot(q, k, trans_b=True) * q.shape[-1] ** -0.5
  if spec.logit_softcap is None:
    return s, None
  capped = jnp.tanh(s / spec.logit_softcap)
  return spec.logit_softcap * capped, capped


def _load(ref, index=...):
  """ref[index], or None for an absent (segment id) ref."""
  return None if ref is None else ref[index]


def attend(q: jax.Array, q_pos: jax.Array, q_seg: jax.Array | None, k_ref, v_ref, kv_pos_ref, kv_seg_ref,
           first: jax.Array, last: jax.Array, *, spec: Spec, block_k: int,
           kv_len: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Online softmax of queries q [R, Dh] over kv blocks first .. last - 1 of k / v refs [T, Dh] and their
  position (segment) refs [T].

  Returns acc [R, Dh], the unnormalised output, the running max m [R] and l [R] = sum exp(s - m), all float32.
  kv_len: the refs are not padded to whole blocks (decode reads the cache in place): the last, partial block
  is read from kv_len - block_k instead, and its keys that the block before already covered are masked.
  """
  def step(j, carry):
    acc, m, l = carry
    start = j * block_k if kv_len is None else jnp.minimum(j * block_k, kv_len - block_k)
    span = pl.ds(start, block_k)
    s, _ = _scores(q, k_ref[span, :], spec)
    seen = visible(q_pos, kv_pos_ref[span], q_seg, _load(kv_seg_ref, span), spec)
    if kv_len is not None:
      seen = seen & (start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1) >= j * block_k)
    s = jnp.where(seen, s, MASKED)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    correction = jnp.exp(m - m_next)
    p = jnp.exp(s - m_next[:, None])
    v = v_ref[span, :]
    return (correction[:, None] * acc + _dot(p.astype(v.dtype), v), m_next,
            correction * l + jnp.sum(p, axis=1))

  rows, dh = q.shape
  init = (jnp.zeros((rows, dh), jnp.float32), jnp.full((rows,), MASKED, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  return lax.fori_loop(first, last, step, init)


def _forward_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref,
                    out_ref, lse_ref, *, spec: Spec, block_k: int):
  acc, m, l = attend(q_ref[...], q_pos_ref[...], _load(q_seg_ref), k_ref, v_ref, kv_pos_ref, kv_seg_ref,
                     first_ref[...], last_ref[...], spec=spec, block_k=block_k)
  out_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(m == MASKED, jnp.inf, m + jnp.log(l))


def _probs_and_score_grads(q, k, v, do, lse, delta, seen, spec: Spec) -> tuple[jax.Array, jax.Array]:
  """One block's p = exp(s - lse) [R, C] and dL/d(q k^T / sqrt(Dh)) [R, C], recomputed from the saved lse."""
  s, capped = _scores(q, k, spec)
  p = jnp.exp(jnp.where(seen, s, MASKED) - lse[:, None])
  ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
  if capped is not None:
    ds = ds * (1.0 - capped * capped)
  return p, ds


def _dq_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, kv_pos_ref,
               q_seg_ref, kv_seg_ref, dq_ref, *, spec: Spec, block_k: int):
  q, do, lse, delta, q_pos = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], q_pos_ref[...]
  q_seg = _load(q_seg_ref)

  def step(j, dq):
    span = pl.ds(j * block_k, block_k)
    k = k_ref[span, :]
    seen = visible(q_pos, kv_pos_ref[span], q_seg, _load(kv_seg_ref, span), spec)
    _, ds = _probs_and_score_grads(q, k, v_ref[span, :], do, lse, delta, seen, spec)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(first_ref[...], last_ref[...], step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * q.shape[-1] ** -0.5).astype(dq_ref.dtype)


def _dkdv_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, kv_pos_ref,
                 q_seg_ref, kv_seg_ref, dk_ref, dv_ref, *, spec: Spec, block_q: int, group: int):
  k, v, kv_pos, kv_seg = k_ref[...], v_ref[...], kv_pos_ref[...], _load(kv_seg_ref)

  def step(g, i, carry):
    dk, dv = carry
    span = pl.ds(i * block_q, block_q)
    q, do = q_ref[span, g, :], do_ref[span, g, :]
    seen = visible(q_pos_ref[span], kv_pos, _load(q_seg_ref, span), kv_seg, spec)
    p, ds = _probs_and_score_grads(q, k, v, do, lse_ref[g, span], delta_ref[g, span], seen, spec)
    return (dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv + _dot(p.astype(do.dtype), do, trans_a=True))

  first, last = first_ref[...], last_ref[...]
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, lambda g, carry: lax.fori_loop(first, last, functools.partial(step, g), carry),
                         (zeros, zeros))
  dk_ref[...] = (dk * k.shape[-1] ** -0.5).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def kv_block(spec: Spec, rows: int, head_dim: int, index: Callable[..., tuple]) -> pl.BlockSpec:
  """A [rows, Dh] block of k / v (or dk / dv) in either layout; index(*grid) -> (batch row, kv head, row block)."""
  def block_index(*grid):
    b, kv_head, j = index(*grid)
    return (b, kv_head, j, 0) if spec.kv_heads_major else (b, j, kv_head, 0)
  return pl.BlockSpec((None, None, rows, head_dim) if spec.kv_heads_major else (None, rows, None, head_dim),
                      block_index)


def compiler_params(head_dim: int) -> plgpu.CompilerParams:
  """Triton launch settings (ignored when interpreting): the FlashAttention tutorial's."""
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def kv_shape(k: jax.Array, spec: Spec) -> tuple[int, int]:
  """(K, T) of k in its layout."""
  return (k.shape[1], k.shape[2]) if spec.kv_heads_major else (k.shape[2], k.shape[1])


def _row_specs(mask: BlockMask, q_rows: int, kv_rows: int, q_index, kv_index) -> list[pl.BlockSpec | None]:
  """Specs of (q positions, kv positions, q segment ids, kv segment ids): [B, S] / [B, T] row blocks."""
  q_spec, kv_spec = pl.BlockSpec((None, q_rows), q_index), pl.BlockSpec((None, kv_rows), kv_index)
  return [q_spec, kv_spec] + ([q_spec, kv_spec] if mask.q_segment_ids is not None else [None, None])


def _forward(q, k, v, mask: BlockMask, spec: Spec, blocks: BlockSizes, interpret: bool):
  b, s, h, dh = q.shape
  kv_heads, t = kv_shape(k, spec)
  bq, bk, group = blocks.block_q, blocks.block_k, h // kv_heads
  first, last = block_span(visible_blocks(mask, spec, bq, bk), axis=2)
  q_spec = pl.BlockSpec((None, bq, None, dh), lambda b, h, i: (b, i, h, 0))
  kv_spec = kv_block(spec, t, dh, lambda b, h, i: (b, h // group, 0))
  return pl.pallas_call(
      functools.partial(_forward_kernel, spec=spec, block_k=bk),
      grid=(b, h, s // bq),
      in_specs=[pl.BlockSpec((None, None), lambda b, h, i: (b, i))] * 2 + [q_spec, kv_spec, kv_spec]
      + _row_specs(mask, bq, t, lambda b, h, i: (b, i), lambda b, h, i: (b, 0)),
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s), jnp.float32)],
      compiler_params=compiler_params(dh),
      interpret=interpret,
      name="flash_attention_forward",
  )(first, last, q, k, v, *mask)


def _backward(q, k, v, mask: BlockMask, out, lse, dout, dlse, spec: Spec, blocks: BlockSizes, interpret: bool):
  b, s, h, dh = q.shape
  kv_heads, t = kv_shape(k, spec)
  bq, bk, group = blocks.block_q_backward, blocks.block_k_backward, h // kv_heads
  delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), dout.astype(jnp.float32)) - dlse
  seen = visible_blocks(mask, spec, bq, bk)
  params = dict(compiler_params=compiler_params(dh), interpret=interpret)
  operands = (q, k, v, dout, lse, delta, *mask)

  q_spec = pl.BlockSpec((None, bq, None, dh), lambda b, h, i: (b, i, h, 0))
  whole_kv = kv_block(spec, t, dh, lambda b, h, i: (b, h // group, 0))
  rows = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, block_k=bk),
      grid=(b, h, s // bq),
      in_specs=[pl.BlockSpec((None, None), lambda b, h, i: (b, i))] * 2 + [q_spec, whole_kv, whole_kv, q_spec, rows,
                                                                          rows]
      + _row_specs(mask, bq, t, lambda b, h, i: (b, i), lambda b, h, i: (b, 0)),
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      name="flash_attention_dq",
      **params,
  )(*block_span(seen, axis=2), *operands)

  whole_q = pl.BlockSpec((None, s, group, dh), lambda b, kh, j: (b, 0, kh, 0))
  kv_spec = kv_block(spec, bk, dh, lambda b, kh, j: (b, kh, j))
  group_rows = pl.BlockSpec((None, group, s), lambda b, kh, j: (b, kh, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, spec=spec, block_q=bq, group=group),
      grid=(b, kv_heads, t // bk),
      in_specs=[pl.BlockSpec((None, None), lambda b, kh, j: (b, j))] * 2 + [whole_q, kv_spec, kv_spec, whole_q,
                                                                           group_rows, group_rows]
      + _row_specs(mask, s, bk, lambda b, kh, j: (b, 0), lambda b, kh, j: (b, j)),
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name="flash_attention_dkdv",
      **params,
  )(*block_span(seen, axis=1), *operands)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, mask: BlockMask, spec: Spec, blocks: BlockSizes, interpret: bool):
  """(out, lse [B, H, S]) of padded inputs; lse = +inf for a query that sees no key."""
  return _forward(q, k, v, mask, spec, blocks, interpret)


def _flash_forward(q, k, v, mask, spec, blocks, interpret):
  out, lse = _forward(q, k, v, mask, spec, blocks, interpret)
  return (out, lse), (q, k, v, mask, out, lse)


def _flash_backward(spec, blocks, interpret, residuals, cotangents):
  q, k, v, mask, out, lse = residuals
  dout, dlse = cotangents
  return *_backward(q, k, v, mask, out, lse, dout, dlse, spec, blocks, interpret), None


_flash.defvjp(_flash_forward, _flash_backward)


def rows_may_see_nothing(mask: MaskArrays, spec: Spec, q_len: int, kv_len: int) -> bool:
  """False only where every query provably sees a key: default positions, no lengths or segment ids, and no
  window or T >= S (query s then sees key s, or key 0 without a window)."""
  return any(x is not None for x in mask) or (spec.window is not None and kv_len < q_len)


def value_mean(v: jax.Array, spec: Spec, num_heads: int) -> jax.Array:
  """[B, 1, H, Dh]: the mean over T of each query head's values, what a query that sees no key gets."""
  mean = jnp.mean(v.astype(jnp.float32), axis=2 if spec.kv_heads_major else 1)  # [B, K, Dh]
  return jnp.repeat(mean, num_heads // mean.shape[1], axis=1)[:, None].astype(v.dtype)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("spec", "block_sizes", "interpret"))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskArrays, *, spec: Spec,
                    block_sizes: BlockSizes = BlockSizes(), interpret: bool = False) -> jax.Array:
  """q [B, S, H, Dh], k / v [B, T, K, Dh] (or [B, K, T, Dh]) -> [B, S, H, Dh] with the kernels above; any S, T."""
  b, s, h, _ = q.shape
  t_axis = 2 if spec.kv_heads_major else 1
  t = k.shape[t_axis]
  blocks = block_sizes.fitted(s, t)
  padded_s = _round_up(s, math.lcm(blocks.block_q, blocks.block_q_backward))
  padded_t = _round_up(t, math.lcm(blocks.block_k, blocks.block_k_backward))
  out, lse = _flash(pad_axis(q, 1, padded_s), pad_axis(k, t_axis, padded_t), pad_axis(v, t_axis, padded_t),
                    pad_mask(block_mask(mask, b, s, t), padded_s, padded_t), spec, blocks, interpret)
  out = out[:, :s]
  if rows_may_see_nothing(mask, spec, s, t):
    sees_nothing = jnp.isinf(lse[:, :, :s]).transpose(0, 2, 1)[..., None]
    out = jnp.where(sees_nothing, value_mean(v, spec, h), out)
  return out
