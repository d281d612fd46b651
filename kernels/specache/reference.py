"""The plain-XLA oracles for attention's two products over bit-packed low-bit K / V, and the bit layout the
kernels share.

Bit layout (KIVI codes, b in {1, 2} bits): a row of Dh codes packs into P = Dh * b / 8 bytes; bit slot j of
byte p holds channel j * P + p, so unpacking slot j yields the contiguous channels [j P, (j + 1) P) (a kernel
unpacks with one shift and mask per slot, no interleaving).

Keys are quantised per channel over groups of g consecutive tokens: codes [B, K, T, P] uint8, scale and zero
[B, K, T / g, Dh]; key t, channel d reconstructs as codes * scale[t // g, d] + zero[t // g, d]. Values are
quantised per token over groups of g_v consecutive channels: scale and zero [B, K, T, Dh / g_v].
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def codes_per_byte(bits: int) -> int:
  if bits not in (1, 2, 4, 8):
    raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits}")
  return 8 // bits


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
  """codes [..., Dh] (integers in [0, 2^bits)) -> uint8 [..., Dh * bits / 8] in the layout above."""
  per = codes_per_byte(bits)
  dh = codes.shape[-1]
  if dh % per:
    raise ValueError(f"pack_bits: {dh} channels do not fill whole bytes of {per} {bits}-bit codes")
  slots = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], per, dh // per)
  shifts = (jnp.arange(per, dtype=jnp.uint8) * bits)[:, None]
  # The slots occupy disjoint bits, so their sum is their bitwise or.
  return jnp.sum((slots << shifts).astype(jnp.uint32), axis=-2).astype(jnp.uint8)


def unpack_bits(packed: jax.Array, bits: int) -> jax.Array:
  """uint8 [..., P] -> uint8 codes [..., P * 8 / bits] (the inverse of `pack_bits`)."""
  per = codes_per_byte(bits)
  # One broadcast shift over a new slot axis, then a reshape: XLA:CPU fuses it into a vectorised loop, where a
  # concatenate of the per-slot shifts along the byte axis ran 3x slower (the decode step's largest op).
  shifts = (jnp.arange(per, dtype=jnp.uint8) * bits)[:, None]
  codes = (packed[..., None, :] >> shifts) & jnp.uint8((1 << bits) - 1)
  return codes.reshape(*packed.shape[:-1], per * packed.shape[-1])


def dequantize_keys(codes: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """codes [B, K, T, P], scale / zero [B, K, T / g, Dh] -> float32 keys [B, K, T, Dh]."""
  values = unpack_bits(codes, bits).astype(jnp.float32)
  group = codes.shape[2] // scale.shape[2]
  repeat = lambda a: jnp.repeat(a.astype(jnp.float32), group, axis=2)
  return values * repeat(scale) + repeat(zero)


def lowbit_scores(q: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int) -> jax.Array:
  """Scaled scores of queries q [B, K, G, Dh] (G query heads per KV head) against the low-bit keys
  -> float32 [B, K, G, T]: q . k_hat / sqrt(Dh)."""
  keys = dequantize_keys(codes, scale, zero, bits)
  return jnp.einsum("bkgd,bktd->bkgt", q.astype(jnp.float32), keys) * q.shape[-1] ** -0.5


def dequantize_values(codes: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """codes [B, K, T, P], scale / zero [B, K, T, Dh / g_v] -> float32 values [B, K, T, Dh]."""
  values = unpack_bits(codes, bits).astype(jnp.float32)
  *lead, dh = values.shape
  groups = scale.shape[-1]
  grouped = values.reshape(*lead, groups, dh // groups)
  return (grouped * scale[..., None].astype(jnp.float32) + zero[..., None].astype(jnp.float32)).reshape(*lead, dh)


def lowbit_weighted_values(probs: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, *,
                           bits: int) -> jax.Array:
  """Attention weights probs [B, K, G, T] times the low-bit values -> float32 [B, K, G, Dh]."""
  values = dequantize_values(codes, scale, zero, bits)
  return jnp.einsum("bkgt,bktd->bkgd", probs.astype(jnp.float32), values)


def mixed_scores(q: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, held: jax.Array,
                 held_keys: jax.Array, exact_keys: jax.Array, *, bits: int,
                 lowbit_scores: Callable[..., jax.Array] = lowbit_scores) -> jax.Array:
  """`lowbit_scores` at the T low-bit slots with the held slots held [B, K, k] (outside [0, T): none) scored
  against held_keys [B, K, k, Dh] instead, then the rows exact_keys [B, K, E, Dh] -> float32 [B, K, G, T + E].
  lowbit_scores: the low-bit product (this module's, or a kernel with its signature)."""
  t = codes.shape[2]
  score = lambda keys: jnp.einsum("bkgd,bkjd->bkgj", q.astype(jnp.float32), keys.astype(jnp.float32)) * (
      q.shape[-1] ** -0.5)
  overwrite = lambda scores, index, update: scores.at[:, index].set(update, mode="drop")
  index = jnp.where((held >= 0) & (held < t), held, t)  # t: out of range, dropped
  low = jax.vmap(jax.vmap(overwrite))(lowbit_scores(q, codes, scale, zero, bits=bits), index, score(held_keys))
  return jnp.concatenate([low, score(exact_keys)], axis=-1)


def mixed_weighted_values(probs: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, held: jax.Array,
                          held_values: jax.Array, exact_values: jax.Array, *, bits: int) -> jax.Array:
  """Weights probs [B, K, G, T + E] times the low-bit values with each held slot's row held_values [B, K, k, Dh]
  in place of its v_hat (a correction p (v - v_hat)), then the rows exact_values [B, K, E, Dh]."""
  t = codes.shape[2]
  probs = probs.astype(jnp.float32)
  out = lowbit_weighted_values(probs[..., :t], codes, scale, zero, bits=bits)
  slot = jnp.clip(held, 0, t - 1)
  approx = dequantize_values(*(jnp.take_along_axis(a, slot[..., None], axis=2) for a in (codes, scale, zero)), bits)
  held_probs = jnp.take_along_axis(probs, slot[:, :, None], axis=-1)
  held_probs = jnp.where(((held >= 0) & (held < t))[:, :, None], held_probs, 0.0)
  weigh = lambda p, rows: jnp.einsum("bkgj,bkjd->bkgd", p, rows.astype(jnp.float32))
  return out + weigh(held_probs, held_values.astype(jnp.float32) - approx) + weigh(probs[..., t:], exact_values)


MASKED = -1e30  # the score a slot the query does not see gets before the softmax (finite: no NaN in a row of none)


def mixed_probabilities(q: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, held: jax.Array,
                        held_keys: jax.Array, exact_keys: jax.Array, visible: jax.Array, *, bits: int,
                        logit_softcap: float | None = None,
                        lowbit_scores: Callable[..., jax.Array] = lowbit_scores) -> jax.Array:
  """Attention probabilities over the mixed cache -> float32 [B, K, G, T + E]: the softmax over the slots
  visible [B, G, T + E] (the same for every KV head) of `mixed_scores`, soft-capped first (c tanh(s / c))."""
  scores = mixed_scores(q, codes, scale, zero, held, held_keys, exact_keys, bits=bits, lowbit_scores=lowbit_scores)
  if logit_softcap is not None:
    scores = logit_softcap * jnp.tanh(scores / logit_softcap)
  return jax.nn.softmax(jnp.where(visible[:, None], scores, MASKED), axis=-1)
