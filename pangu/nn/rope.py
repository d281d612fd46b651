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
  # llama3: wavelengths longer than the trained context are interpolated by `factor`, short ones kept, and
  # the band between blends the two linearly in context / wavelength.
  context = scaling.original_max_position_embeddings
  wavelength = 2 * math.pi / inv_freq
  smooth = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
  blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
  return jnp.where(wavelength < context / scaling.high_freq_factor, inv_freq,
                   jnp.where(wavelength > context / scaling.low_freq_factor, inv_freq / scaling.factor, blended))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates x [B, S, N, Dh] by angle positions[b, s] * inv_freq; the two halves of Dh form the pairs."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, S, Dh/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)
