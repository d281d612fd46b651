"""Dense feed-forward block: SwiGLU down(silu(x W_gate) * (x W_up)) or the non-gated GELU MLP down(gelu(x W_up))
(GPT-2 / Pythia, and MoLE's shared FFN), as `config.mlp_activation` says; optional biases (`config.mlp_bias`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from pangu.models.config import TransformerConfig
from pangu.nn import init as inits
from pangu.nn import linear
from pangu.parallel import rules


class MLP(nn.Module):
  """x [B, S, D] -> [B, S, D]; kernels gate/up [D, F] and down [F, D] in the training layout."""

  config: TransformerConfig
  d_ff: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config

    def dense(name, inputs, in_axis, out_axis, out_dim, residual_output=False):
      w = linear.kernel(self, cfg, name, (inputs.shape[-1],), (out_dim,), (in_axis,), (out_axis,),
                        inits.kernel_init(cfg, residual_output=residual_output))
      y = linear.project(inputs, w, cfg)
      if cfg.mlp_bias:
        y += self.param(f"{name}_bias", nn.with_logical_partitioning(jax.nn.initializers.zeros, (out_axis,)),
                        (out_dim,), jnp.dtype(cfg.param_dtype)).astype(cfg.dtype)
      return y

    if cfg.mlp_activation == "swiglu":
      gate = dense("gate", x, rules.EMBED, rules.MLP, self.d_ff)
      hidden = jax.nn.silu(gate) * dense("up", x, rules.EMBED, rules.MLP, self.d_ff)
    else:
      hidden = jax.nn.gelu(dense("up", x, rules.EMBED, rules.MLP, self.d_ff), approximate=False)
    hidden = rules.constrain(hidden, (rules.BATCH, rules.LENGTH, rules.ACT_MLP))
    return dense("down", hidden, rules.MLP, rules.EMBED, cfg.d_model, residual_output=True)
