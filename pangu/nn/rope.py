"""Rotary position embeddings in the rotate-half layout used by Llama/Qwen checkpoints."""

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

from pangu.config_checks import one_of, positive_ints

RopeKind = Literal["linear", "llama3", "yarn"]
ROPE_KINDS = ("linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Stretches RoPE's wavelengths so a model reaches past the context it was trained on.

  Attributes:
    kind: `linear` divides every inverse frequency by `factor` (position interpolation, Chen et al. 2023);
      `llama3` divides only the low frequencies, whose wavelength exceeds
      original_max_position_embeddings / low_freq_factor, keeps the high frequencies (wavelength below
      original_max_position_embeddings / high_freq_factor) and interpolates smoothly in between (Llama 3.1);
      `yarn` divides the dimensions that turn fewer than beta_slow times over the original context by
      `factor`, keeps those turning more than beta_fast times, ramps linearly between the two, and scales
      cos/sin by `attention_factor` (YaRN, Peng et al. 2023; Qwen's long-context configs).
    factor: the context-extension factor.
    low_freq_factor, high_freq_factor, original_max_position_embeddings: the `llama3` band edges.
    beta_fast, beta_slow, truncate: the `yarn` ramp, in rotations over original_max_position_embeddings;
      `truncate` rounds its ends outwards to whole dimensions (Hugging Face's default).
    attention_factor: `yarn`'s cos/sin scale; None means 0.1 ln(factor) + 1.
  """

  kind: RopeKind
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  truncate: bool = True
  attention_factor: float | None = None

  def __post_init__(self):
    one_of(self, "kind", ROPE_KINDS)
    for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
      if not getattr(self, name) > 0:
        raise ValueError(f"RopeScaling.{name} must be > 0, got {getattr(self, name)!r}")
    positive_ints(self, "original_max_position_embeddings")
    if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(f"RopeScaling.high_freq_factor={self.high_freq_factor} must exceed "
                       f"low_freq_factor={self.low_freq_factor}")
    if self.attention_factor is not None and not self.attention_factor > 0:
      raise ValueError(f"RopeScaling.attention_factor must be > 0 or None, got {self.attention_factor!r}")



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
