"""The lightweight pruning modules of SDTP (spec 3.2, paper Eq. 1-2): one two-layer MLP per stage.

pi = Linear_2(GELU(Linear_1(x))) gives keep / drop logits [B, S, 2] per token; the score is their difference,
the log-odds of keeping, and sigmoid(score) the keep probability. The input is RMS-normalised without a gain
first (our choice): the residual stream grows with depth, and one learning rate then suits every stage.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from pangu.infer.sdtp.schedule import SDTPConfig
from pangu.nn.norms import rms_norm
from pangu.parallel import rules

KEEP, DROP = 0, 1


class TokenPredictor(nn.Module):
  """x [B, S, D] -> keep / drop logits [B, S, 2] float32."""

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chex.assert_rank(x, 3)
    x = rms_norm(x.astype(jnp.float32), jnp.ones((x.shape[-1],), jnp.float32), 1e-6)
    dense = lambda width, axes, name: nn.Dense(
        width, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]), name=name)
    h = jax.nn.gelu(dense(self.hidden, (rules.EMBED, rules.MLP), "fc1")(x))
    return dense(2, (rules.MLP, None), "fc2")(h)


def predictor_hidden(config: SDTPConfig, d_model: int) -> int:
  return config.hidden if config.hidden is not None else max(1, d_model // 4)


def boxed_predictors(config: SDTPConfig, d_model: int, rng: jax.Array) -> dict:
  """{"stage_<s>": params} for every stage, logically partitioned (what the shared train step initialises)."""
  module = TokenPredictor(predictor_hidden(config, d_model))
  keys = jax.random.split(rng, config.n_stages)
  x = jnp.zeros((1, 1, d_model), jnp.float32)
  return {f"stage_{s}": module.init(keys[s], x)["params"] for s in range(config.n_stages)}


def init_predictors(config: SDTPConfig, d_model: int, rng: jax.Array) -> dict:
  """{"stage_<s>": params} for every stage, unboxed."""
  return nn.unbox(boxed_predictors(config, d_model, rng))


def predictor_logits(params: dict, stage: int, x: jax.Array) -> jax.Array:
  """Keep / drop logits [B, S, 2] of stage `stage` for hidden states x [B, S, D]."""
  stage_params = params[f"stage_{stage}"]
  # parent=None: the hook runs inside the decoder's module, which must not adopt the predictor.
  return TokenPredictor(stage_params["fc1"]["kernel"].shape[1], parent=None).apply({"params": stage_params}, x)


def keep_scores(logits: jax.Array) -> jax.Array:
  """[B, S] log-odds of keeping each token."""
  return logits[..., KEEP] - logits[..., DROP]


def predictor_flops(config: SDTPConfig, d_model: int, n_tokens_per_stage) -> float:
  """Matmul FLOPs of the predictors, stage s scoring n_tokens_per_stage[s] tokens."""
  hidden = predictor_hidden(config, d_model)
  return float(sum(2 * n * (d_model * hidden + hidden * 2) for n in n_tokens_per_stage))
