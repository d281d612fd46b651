"""Split-K decode attention: a few new queries against a long, ragged KV cache read in place.

q [B, S, H, Dh] (S: the step's new tokens, 1 in plain decoding, a few when verifying drafts) against k / v in the
cache layout [B, K, T, Dh], with slot positions [B, T] (negative: empty or padding) and lengths [B]. One program
per (batch row, kv head, split of T) runs the online softmax of `pallas.attend` for the G * S query rows of its
kv head (every query head of the group and every new token, so each K / V block is read once per kv head) over
the kv blocks of its split that some query may see (the block summaries of pallas.py: slots past a row's
length, or outside the window, are never read), and writes the partial result (acc, m, l). Plain JAX combines
the splits: with m = max_i m_i, out = sum_i e^(m_i - m) acc_i / sum_i e^(m_i - m) l_i. More splits give a small
batch enough programs to fill the GPU at long T.

The cache is not padded to whole blocks (that would copy it on every step): the last, partial block is read from
T - block_k and its slots that the block before already covered are masked. Only a cache shorter than one block
is padded.

A query that sees no key gets the mean of all T values (reference.py's rule) from a second kernel, which reads
the values only of batch rows that have such a query: a normal decoding step pays one empty launch for it.

Forward only: decoding does not differentiate through the cache.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pangu_kernels.attention import pallas
from pangu_kernels.attention.reference import MaskArrays, Spec

DEFAULT_BLOCK_K = 128
# Splits are chosen to give about this many programs (the SM count of an H100 / H200 is 132).
TARGET_PROGRAMS = 128


def _decode_kernel(first_ref, last_ref, q_ref, q_pos_ref, k_ref, v_ref, kv_pos_ref, acc_ref, m_ref, l_ref, *,
                   spec: Spec, block_k: int, kv_len: int):
  acc_ref[...], m_ref[...], l_ref[...] = pallas.attend(
      q_ref[...], q_pos_ref[...], None, k_ref, v_ref, kv_pos_ref, None, first_ref[...], last_ref[...], spec=spec,
      block_k=block_k, kv_len=kv_len)


def _value_mean_kernel(needed_ref, v_ref, mean_ref, *, block_k: int, kv_len: int, num_values: int):
  def add(j, total):
    start = jnp.minimum(j * block_k, kv_len - block_k)
    fresh = start + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) >= j * block_k
    return total + jnp.sum(jnp.where(fresh, v_ref[pl.ds(start, block_k), :].astype(jnp.float32), 0.0), axis=0)

  blocks = jnp.where(needed_ref[...] > 0, pl.cdiv(kv_len, block_k), 0)
  mean_ref[...] = lax.fori_loop(0, blocks, add, jnp.zeros(mean_ref.shape, jnp.float32)) / num_values


def _value_mean(v: jax.Array, needed: jax.Array, *, block_k: int, num_values: int, interpret: bool) -> jax.Array:
  """float32 [B, K, Dh]: the mean of the first num_values slots of v [B, K, T, Dh] for rows with needed[b], else 0."""
  b, kv_heads, t, dh = v.shape
  return pl.pallas_call(
      functools.partial(_value_mean_kernel, block_k=block_k, kv_len=t, num_values=num_values),
      grid=(b, kv_heads),
      in_specs=[pl.BlockSpec((None,), lambda b, kh: (b,)),
                pl.BlockSpec((None, None, t, dh), lambda b, kh: (b, kh, 0, 0))],
      out_specs=pl.BlockSpec((None, None, dh), lambda b, kh: (b, kh, 0)),
      out_shape=jax.ShapeDtypeStruct((b, kv_heads, dh), jnp.float32),
      compiler_params=pallas.compiler_params(dh),
      interpret=interpret,
      name="decode_attention_value_mean",
  )(needed.astype(jnp.int32), v)


@functools.partial(jax.jit, static_argnames=("spec", "block_k", "num_splits", "interpret"))
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskArrays, *, spec: Spec,
                     block_k: int = DEFAULT_BLOCK_K, num_splits: int | None = None,
                     interpret: bool = False) -> jax.Array:
  """q [B, S, H, Dh] against the cache's k / v [B, K, T, Dh] -> [B, S, H, Dh]; spec.kv_heads_major must be set.

  num_splits: splits of T (at most one per kv block); None: enough for about TARGET_PROGRAMS programs.
  """
  b, s, h, dh = q.shape
  kv_heads, t = k.shape[1], k.shape[2]
  group, num_values = h // kv_heads, t
  positions = pallas.block_mask(mask, b, s, t)
  block_k = min(block_k, max(pallas.MIN_BLOCK, 1 << (t.bit_length() - 1)))  # a block never longer than T ...
  if t < block_k:  # ... unless T < MIN_BLOCK: then the (tiny) cache is padded
    k, v = (pallas.pad_axis(x, 2, block_k) for x in (k, v))
    positions = positions._replace(kv_positions=pallas.pad_axis(positions.kv_positions, 1, block_k,
                                                                constant_values=-1))
    t = block_k
  num_blocks = pl.cdiv(t, block_k)
  if num_splits is None:
    num_splits = max(1, TARGET_PROGRAMS // (b * kv_heads))
  per_split = pl.cdiv(num_blocks, min(num_splits, num_blocks))
  num_splits = pl.cdiv(num_blocks, per_split)

  # Query rows r = g * S + s of kv head kh are query head kh * G + g at token s, padded to a dot-sized block.
  rows = group * s
  padded_rows = max(pallas.MIN_BLOCK, pl.next_power_of_2(rows))
  q_rows = q.reshape(b, s, kv_heads, group, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, rows, dh)
  q_rows = pallas.pad_axis(q_rows, 2, padded_rows)
  q_pos = pallas.pad_axis(jnp.tile(positions.q_positions, (1, group)), 1, padded_rows, mode="edge")

  # One q block of all S queries; kv blocks past T (to fill the last split) hold no key.
  summary = positions._replace(kv_positions=pallas.pad_axis(positions.kv_positions, 1,
                                                            num_splits * per_split * block_k, constant_values=-1))
  seen = pallas.visible_blocks(summary, spec, s, block_k).reshape(b, num_splits, per_split)
  first, last = (x + jnp.arange(num_splits, dtype=jnp.int32) * per_split for x in pallas.block_span(seen, axis=2))

  whole_kv = pallas.kv_block(spec, t, dh, lambda b, kh, j: (b, kh, 0))
  split_rows = pl.BlockSpec((None, None, None, padded_rows), lambda b, kh, j: (b, kh, j, 0))
  acc, m, l = pl.pallas_call(
      functools.partial(_decode_kernel, spec=spec, block_k=block_k, kv_len=t),
      grid=(b, kv_heads, num_splits),
      in_specs=[pl.BlockSpec((None, None), lambda b, kh, j: (b, j))] * 2 + [
          pl.BlockSpec((None, None, padded_rows, dh), lambda b, kh, j: (b, kh, 0, 0)),
          pl.BlockSpec((None, padded_rows), lambda b, kh, j: (b, 0)), whole_kv, whole_kv,
          pl.BlockSpec((None, t), lambda b, kh, j: (b, 0))],
      out_specs=[pl.BlockSpec((None, None, None, padded_rows, dh), lambda b, kh, j: (b, kh, j, 0, 0)), split_rows,
                 split_rows],
      out_shape=[jax.ShapeDtypeStruct((b, kv_heads, num_splits, padded_rows, dh), jnp.float32),
                 *[jax.ShapeDtypeStruct((b, kv_heads, num_splits, padded_rows), jnp.float32)] * 2],
      compiler_params=pallas.compiler_params(dh),
      interpret=interpret,
      name="decode_attention",
  )(first, last, q_rows, q_pos, k, v, positions.kv_positions)

  m_max = jnp.max(m, axis=2, keepdims=True)
  weight = jnp.exp(m - m_max)
  total = jnp.sum(weight * l, axis=2)[:, :, :rows, None]
  out = jnp.sum(weight[..., None] * acc, axis=2)[:, :, :rows] / jnp.where(total > 0, total, 1.0)
  sees_nothing = (m_max[:, :, 0, :rows] == pallas.MASKED)[..., None]  # [B, K, rows, 1]
  mean = _value_mean(v, jnp.any(sees_nothing, axis=(1, 2, 3)), block_k=block_k, num_values=num_values,
                     interpret=interpret)
  out = jnp.where(sees_nothing, mean[:, :, None], out)
  return out.reshape(b, kv_heads, group, s, dh).transpose(0, 3, 1, 2, 4).reshape(b, s, h, dh).astype(q.dtype)
