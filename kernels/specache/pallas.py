"""Pallas kernel: queries against bit-packed low-bit keys, unpacked and dequantised block by block in fast memory.

Grid (B * K, T / block_t): each program loads the G queries of one KV head, one block of packed codes
[block_t, P] and its scale / zero rows [block_t / g, Dh], and writes scores [G, block_t]. The dequantised keys
never exist in device memory: the kernel reads b / 16 of the bytes a 16-bit key cache would need.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pangu_kernels.specache.reference import codes_per_byte

DEFAULT_BLOCK_TOKENS = 128


def _kernel(q_ref, codes_ref, scale_ref, zero_ref, out_ref, *, bits: int, group: int):
  per = codes_per_byte(bits)
  q = q_ref[0].astype(jnp.float32)  # [G, Dh]
  codes = codes_ref[0]  # [bt, P]
  scale, zero = scale_ref[0].astype(jnp.float32), zero_ref[0].astype(jnp.float32)  # [bt / g, Dh]
  bt, p = codes.shape
  scores = jnp.zeros((q.shape[0], bt), jnp.float32)
  for j in range(per):  # bit slot j holds channels [j P, (j + 1) P)
    channels = slice(j * p, (j + 1) * p)
    values = ((codes >> (j * bits)) & ((1 << bits) - 1)).astype(jnp.float32)  # [bt, P]
    keys = (values.reshape(bt // group, group, p) * scale[:, None, channels]
            + zero[:, None, channels]).reshape(bt, p)
    scores += jax.lax.dot_general(q[:, channels], keys, (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)
  out_ref[0] = scores * q.shape[-1] ** -0.5


@functools.partial(jax.jit, static_argnames=("bits", "block_tokens", "interpret"))
def lowbit_scores(q: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int,
                  block_tokens: int = DEFAULT_BLOCK_TOKENS, interpret: bool = False) -> jax.Array:
  """Same contract as `reference.lowbit_scores`; T must be a multiple of block_tokens, which g divides."""
  b, k, g_heads, dh = q.shape
  t, p = codes.shape[2], codes.shape[3]
  group = t // scale.shape[2]
  block_tokens = min(block_tokens, t)
  if t % block_tokens or block_tokens % group:
    raise ValueError(f"lowbit_scores: T={t} must be a multiple of block_tokens={block_tokens}, itself a multiple "
                     f"of the group size {group}")
  flat = lambda a: a.reshape(b * k, *a.shape[2:])
  out = pl.pallas_call(
      functools.partial(_kernel, bits=bits, group=group),
      grid=(b * k, t // block_tokens),
      in_specs=[pl.BlockSpec((1, g_heads, dh), lambda i, j: (i, 0, 0)),
                pl.BlockSpec((1, block_tokens, p), lambda i, j: (i, j, 0)),
                pl.BlockSpec((1, block_tokens // group, dh), lambda i, j: (i, j, 0)),
                pl.BlockSpec((1, block_tokens // group, dh), lambda i, j: (i, j, 0))],
      out_specs=pl.BlockSpec((1, g_heads, block_tokens), lambda i, j: (i, 0, j)),
      out_shape=jax.ShapeDtypeStruct((b * k, g_heads, t), jnp.float32),
      interpret=interpret,
  )(flat(q), flat(codes), flat(scale), flat(zero))
  return out.reshape(b, k, g_heads, t)
