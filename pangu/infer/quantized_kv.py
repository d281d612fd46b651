"""KIVI-style low-bit KV quantisation: keys per channel over groups of g tokens, values per token over groups of
g_v = min(g, Dh) channels, codes bit-packed into uint8 (pangu_kernels.specache's layout) so device bytes shrink.

Quantiser (SpeCache spec section 3.2), per group with min m and max M:
  * b-bit `minmax` (KIVI): z = m, s = (M - m) / (2^b - 1), q = clip(round((x - z) / s), 0, 2^b - 1);
  * 1-bit `quarter` (SpeCache's fix): z = (3m + M) / 4, s = (M - m) / 2, so the two levels sit at the quarter
    points instead of the extremes, which plain 1-bit reconstruction overestimates;
  * x_hat = q s + z; a constant group (s = 0) reconstructs exactly. Either way |x - x_hat| <= s / 2.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pangu.config_checks import one_of
from pangu_kernels.specache.reference import dequantize_keys, dequantize_values, pack_bits

ONE_BIT_LEVELS = ("quarter", "minmax")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Attributes:
    bits: b, 1 or 2.
    group: g, tokens per key group and (capped at Dh) channels per value group.
    one_bit_levels: where 1-bit codes reconstruct: `quarter` points (SpeCache) or `minmax` (plain KIVI).
  """

  bits: int = 2
  group: int = 32
  one_bit_levels: str = "quarter"

  def __post_init__(self):
    if self.bits not in (1, 2):
      raise ValueError(f"QuantConfig.bits must be 1 or 2, got {self.bits!r}")
    if not isinstance(self.group, int) or self.group < 1:
      raise ValueError(f"QuantConfig.group must be a positive int, got {self.group!r}")
    one_of(self, "one_bit_levels", ONE_BIT_LEVELS)

  def value_group(self, head_dim: int) -> int:
    return min(self.group, head_dim)


class LowBit(NamedTuple):
  """Packed codes [B, K, T, Dh * b / 8] uint8 with their float32 scale and zero (shape per `quantize_keys` /
  `quantize_values`)."""

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array


def quantize_groups(x: jax.Array, axis: int, config: QuantConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x grouped along `axis` (each slice along it is one group) -> (codes uint8 like x, scale, zero with `axis`
  kept at size 1)."""
  x = x.astype(jnp.float32)
  low, high = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
  if config.bits == 1 and config.one_bit_levels == "quarter":
    zero, scale = (3 * low + high) / 4, (high - low) / 2
  else:
    zero, scale = low, (high - low) / (2 ** config.bits - 1)
  safe = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.clip(jnp.round((x - zero) / safe), 0, 2 ** config.bits - 1)
  codes = jnp.where(scale > 0, codes, 0.0)
  zero = jnp.where(scale > 0, zero, low)  # a constant group reconstructs as the constant
  return codes.astype(jnp.uint8), scale, zero


def quantize_keys(keys: jax.Array, config: QuantConfig) -> LowBit:
  """keys [B, K, T, Dh], T a multiple of g -> codes [B, K, T, Dh b / 8], scale / zero [B, K, T / g, Dh]."""
  b, k, t, dh = keys.shape
  if t % config.group:
    raise ValueError(f"quantize_keys: {t} tokens are not whole groups of {config.group}")
  codes, scale, zero = quantize_groups(keys.reshape(b, k, t // config.group, config.group, dh), 3, config)
  return LowBit(pack_bits(codes.reshape(b, k, t, dh), config.bits), scale[:, :, :, 0], zero[:, :, :, 0])


def quantize_values(values: jax.Array, config: QuantConfig) -> LowBit:
  """values [B, K, T, Dh] -> codes [B, K, T, Dh b / 8], scale / zero [B, K, T, Dh / g_v]."""
  b, k, t, dh = values.shape
  gv = config.value_group(dh)
  if dh % gv:
    raise ValueError(f"quantize_values: head dim {dh} is not whole groups of {gv} channels")
  codes, scale, zero = quantize_groups(values.reshape(b, k, t, dh // gv, gv), 4, config)
  return LowBit(pack_bits(codes.reshape(b, k, t, dh), config.bits), scale[..., 0], zero[..., 0])


def dequantize(low: LowBit, bits: int, *, keys: bool) -> jax.Array:
  """Keys or values back to float32 [B, K, T, Dh]."""
  return dequantize_keys(*low, bits) if keys else dequantize_values(*low, bits)


def lowbit_bytes_per_token(head_dim: int, config: QuantConfig, scale_bytes: int) -> float:
  """Device bytes per token and KV head of the low-bit K and V (codes + scale and zero at `scale_bytes` each):
  K codes b Dh / 8 + 2 Dh scale_bytes / g, V codes b Dh / 8 + 2 (Dh / g_v) scale_bytes (spec section 3.6)."""
  codes = config.bits * head_dim / 8
  return 2 * codes + 2 * head_dim * scale_bytes / config.group + 2 * (head_dim // config.value_group(head_dim)) * scale_bytes
