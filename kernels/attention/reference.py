"""Plain-XLA attention with a structural mask: the oracle the flash and decode kernels are tested against.

It builds the whole [B, S, T] mask and [B, H, S, T] score tensor (only an oracle may), computes scores and the
softmax in float32 whatever the input dtype, and is written from the mask definition below, sharing no code with
the kernels.

Mask: query s of row b sees key t iff all of these hold
  * kv_positions[b, t] >= 0 (a negative position marks padding or an empty cache slot);
  * t < kv_lengths[b];
  * causal: kv_positions[b, t] <= q_positions[b, s];
  * window: |q_positions[b, s] - kv_positions[b, t]| < window;
  * q_segment_ids[b, s] == kv_segment_ids[b, t].
Missing positions default to 0..S-1 / 0..T-1; a missing length or segment id constrains nothing. A query that
sees no key (left padding) gets the mean of all T values, the softmax of T equal scores, never NaN: the rule of
pangu's attention reference, so that every implementation gives the same rows.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


class MaskArrays(NamedTuple):
  """The array half of a mask (see the module docstring); any field may be None.

  Attributes:
    q_positions: int [B, S].
    kv_positions: int [B, T].
    kv_lengths: int [B].
    q_segment_ids, kv_segment_ids: int [B, S] and [B, T], both or neither.
  """

  q_positions: jax.Array | None = None
  kv_positions: jax.Array | None = None
  kv_lengths: jax.Array | None = None
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static half of a call: what the kernels specialise on (hashable, so it keys their compiles).

  Attributes:
    causal: keys after the query's position are hidden.
    window: keys at distance >= window are hidden; None: no window.
    logit_softcap: scores become softcap * tanh(scores / softcap) before masking (Gemma 2); None: off.
    kv_heads_major: k and v are in the KV cache's [B, K, T, Dh] layout instead of [B, T, K, Dh].
  """

  causal: bool = True
  window: int | None = None
  logit_softcap: float | None = None
  kv_heads_major: bool = False


def dense_mask(mask: MaskArrays, spec: Spec, q_len: int, kv_len: int) -> jax.Array:
  """bool [B or 1, S, T]: which keys each query sees."""
  q_pos = jnp.arange(q_len)[None] if mask.q_positions is None else mask.q_positions
  kv_pos = jnp.arange(kv_len)[None] if mask.kv_positions is None else mask.kv_positions
  q_pos, kv_pos = q_pos[:, :, None], kv_pos[:, None, :]
  seen = jnp.broadcast_to(kv_pos >= 0, (kv_pos.shape[0], q_len, kv_len))
  if mask.kv_lengths is not None:
    seen = seen & (jnp.arange(kv_len)[None, None, :] < mask.kv_lengths[:, None, None])
  if spec.causal:
    seen = seen & (kv_pos <= q_pos)
  if spec.window is not None:
    seen = seen & (jnp.abs(q_pos - kv_pos) < spec.window)
  if mask.q_segment_ids is not None:
    seen = seen & (mask.q_segment_ids[:, :, None] == mask.kv_segment_ids[:, None, :])
  return seen


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskArrays, spec: Spec) -> jax.Array:
  """q [B, S, H, Dh], k / v [B, T, K, Dh] ([B, K, T, Dh] with spec.kv_heads_major) -> [B, S, H, Dh] in q's dtype.

  Query head h reads kv head h // (H / K). Scores are scaled by Dh^-0.5.
  """
  b, s, h, dh = q.shape
  dtype = q.dtype
  if spec.kv_heads_major:
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
  t, kv_heads = k.shape[1], k.shape[2]
  q = q.astype(jnp.float32).reshape(b, s, kv_heads, h // kv_heads, dh)
  scores = jnp.einsum("bskgd,btkd->bkgst", q, k.astype(jnp.float32)) * dh ** -0.5
  if spec.logit_softcap is not None:
    scores = spec.logit_softcap * jnp.tanh(scores / spec.logit_softcap)
  seen = dense_mask(mask, spec, s, t)[:, None, None]
  sees_any = jnp.any(seen, axis=-1, keepdims=True)
  scores = jnp.where(seen, scores, -jnp.inf)
  probs = jax.nn.softmax(jnp.where(sees_any, scores, 0.0), axis=-1)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(jnp.float32))
  return out.reshape(b, s, h, dh).astype(dtype)
