"""SwiGLU feed-forward block: down(silu(x W_gate) * (x W_up))."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from pangu.nn import init as inits
from pangu.models.config import TransformerConfig
from pangu.parallel import rules


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """x [B, S, D], gate/up [D, F], down [F, D] -> [B, S, D]."""
  hidden = jax.nn.silu(jnp.einsum("bsd,df->bsf", x, gate)) * jnp.einsum("bsd,df->bsf", x, up)
  hidden = rules.constrain(hidden, (rules.BATCH, rules.LENGTH, rules.ACT_MLP))
  return jnp.einsum("bsf,fd->bsd", hidden, down)


class SwiGLU(nn.Module):
  config: TransformerConfig
  d_ff: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    pdt = jnp.dtype(cfg.param_dtype)

    def kernel(name, shape, axes, residual_output=False):
      init = inits.kernel_init(cfg, residual_output=residual_output)
      return self.param(name, nn.with_logical_partitioning(init, axes), shape, pdt).astype(cfg.dtype)

    gate = kernel("gate", (cfg.d_model, self.d_ff), (rules.EMBED, rules.MLP))
    up = kernel("up", (cfg.d_model, self.d_ff), (rules.EMBED, rules.MLP))
    down = kernel("down", (self.d_ff, cfg.d_model), (rules.MLP, rules.EMBED), residual_output=True)
    return swiglu(x, gate, up, down)
