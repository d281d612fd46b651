"""RMSNorm and the gain initialisation of Pangu Ultra's depth-scaled sandwich norm (DSSN)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pangu.parallel import rules


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) * scale, computed in float32 and cast back to x's dtype (Llama convention)."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def depth_scaled_gain(c: float, n_layers: int) -> float:
  """DSSN post-norm gain c / sqrt(L): each sublayer then adds RMS ~c/sqrt(L), so the residual variance after
  L layers is ~c_attn^2 + c_mlp^2 whatever the depth (Pangu Ultra, eq. 2)."""
  return c / math.sqrt(n_layers)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a per-channel gain initialised to `gain_init`."""

  eps: float = 1e-5
  gain_init: float = 1.0
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(jax.nn.initializers.constant(self.gain_init), (rules.NORM,)),
        (x.shape[-1],), self.param_dtype)
    return rms_norm(x, scale, self.eps)
