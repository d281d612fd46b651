"""Dense feed-forward block: SwiGLU down(silu(x W_gate) * (x W_up)) or the non-gated GELU MLP down(gelu(x W_up))
(GPT-2 / Pythia, and MoLE's shared FFN), with optional biases."""

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from pangu.config_checks import one_of, positive_ints
from pangu.nn import linear
from pangu.nn.linear import ProjectionConfig
from pangu.parallel import rules

MlpActivation = Literal["swiglu", "gelu"]
MLP_ACTIVATIONS = ("swiglu", "gelu")
Initializer = jax.nn.initializers.Initializer


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """A dense feed-forward layer.

  Attributes:
    d_model: D, input and output width.
    d_ff: F, hidden width.
    activation: `swiglu` (gate, up, down) or `gelu` (up, down; exact-erf GELU).
    bias: every projection carries a bias (Llama's `mlp_bias`).
    projection: how the kernels are stored and applied.
  """

  d_model: int
  d_ff: int
  activation: MlpActivation = "swiglu"
  bias: bool = False
  projection: ProjectionConfig = ProjectionConfig()

  def __post_init__(self):
    positive_ints(self, "d_model", "d_ff")
    one_of(self, "activation", MLP_ACTIVATIONS)


class MLP(nn.Module):
  """x [B, S, D] -> [B, S, D]; kernels gate/up [D, F] and down [F, D] in the training layout.

  Attributes:
    config: the layer's MLPConfig.
    kernel_init: initialiser of gate and up.
    output_init: initialiser of down (a residual-branch output).
  """

  config: MLPConfig
  kernel_init: Initializer = jax.nn.initializers.normal(0.02)
  output_init: Initializer = jax.nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    proj = cfg.projection

    def dense(name, inputs, in_axis, out_axis, out_dim, init):
      w = linear.kernel(self, proj, name, (inputs.shape[-1],), (out_dim,), (in_axis,), (out_axis,), init)
      y = linear.project(inputs, w, proj)
      if cfg.bias:
        y += self.param(f"{name}_bias", nn.with_logical_partitioning(jax.nn.initializers.zeros, (out_axis,)),
                        (out_dim,), jnp.dtype(proj.param_dtype)).astype(proj.dtype)
      return y

    if cfg.activation == "swiglu":
      gate = dense("gate", x, rules.EMBED, rules.MLP, cfg.d_ff, self.kernel_init)
      hidden = jax.nn.silu(gate) * dense("up", x, rules.EMBED, rules.MLP, cfg.d_ff, self.kernel_init)
    else:
      hidden = jax.nn.gelu(dense("up", x, rules.EMBED, rules.MLP, cfg.d_ff, self.kernel_init), approximate=False)
    hidden = rules.constrain(hidden, (rules.BATCH, rules.LENGTH, rules.ACT_MLP))
    # The channels structured pruning scores (pangu.compress.prune); a no-op unless `intermediates` is mutable.
    self.sow("intermediates", "hidden", hidden)
    return dense("down", hidden, rules.MLP, rules.EMBED, cfg.d_model, self.output_init)
