"""Rotary position embeddings in the rotate-half layout used by Llama/Qwen checkpoints."""

import math

import jax
import jax.numpy as jnp

from pangu.models.config import RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
  """Inverse frequencies theta^(-2i/Dh), i < Dh/2, stretched by `scaling` (see `RopeScaling`)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv_freq
  if scaling.kind == "linear":
    return inv_freq / scaling.factor
  if scaling.kind == "yarn":
    return _yarn_frequencies(inv_freq, head_dim, theta, scaling)
  # llama3: wavelengths longer than the trained context are interpolated by `factor`, short ones kept, and
  # the band between blends the two linearly in context / wavelength.
  context = scaling.original_max_position_embeddings
  wavelength = 2 * math.pi / inv_freq
  smooth = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
  blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
  return jnp.where(wavelength < context / scaling.high_freq_factor, inv_freq,
                   jnp.where(wavelength > context / scaling.low_freq_factor, inv_freq / scaling.factor, blended))


def _yarn_frequencies(inv_freq: jax.Array, head_dim: int, theta: float, scaling: RopeScaling) -> jax.Array:
  """YaRN's blend: dimension i keeps inv_freq_i when it turns more than beta_fast times over the original
  context, takes inv_freq_i / factor below beta_slow turns, and ramps linearly in i between the two."""

  def dimension(rotations):  # the (fractional) dimension index that turns `rotations` times over the context
    context = scaling.original_max_position_embeddings
    return head_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = dimension(scaling.beta_fast), dimension(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001
  kept = 1 - jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  return inv_freq / scaling.factor * (1 - kept) + inv_freq * kept


def rope_attention_factor(scaling: RopeScaling | None) -> float:
  """The scale YaRN puts on cos and sin (so on q.k, squared): attention_factor, or 0.1 ln(factor) + 1."""
  if scaling is None or scaling.kind != "yarn":
    return 1.0
  if scaling.attention_factor is not None:
    return scaling.attention_factor
  return 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0) -> jax.Array:
  """Rotates x [B, S, N, Dh] by angle positions[b, s] * inv_freq, times `scale` (see rope_attention_factor);
  the two halves of Dh form the pairs."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, S, Dh/2]
  sin = scale * jnp.sin(angles)[:, :, None, :]
  cos = scale * jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)
