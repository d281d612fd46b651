"""Rotary position embeddings in the rotate-half layout used by Llama/Qwen checkpoints."""

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """Inverse frequencies theta^(-2i/Dh), i < Dh/2."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates x [B, S, N, Dh] by angle positions[b, s] * inv_freq; the two halves of Dh form the pairs."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, S, Dh/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)
