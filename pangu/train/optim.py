"""The optimizer: global-norm clipping, then AdamW on a warmup + cosine schedule."""

import jax
import optax

from pangu.train.config import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.peak_lr, warmup_steps=config.warmup_steps,
      decay_steps=config.total_steps, end_value=config.end_lr)


def weight_decay_mask(config: TrainConfig, params):
  """Decay matrices and embeddings; RMSNorm gains (leaves named `scale`) only if `decay_norm_gains`."""
  def decays(path, _):
    is_gain = any(getattr(k, "key", None) == "scale" for k in path)
    return config.decay_norm_gains or not is_gain
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                  weight_decay=config.weight_decay, mask=lambda p: weight_decay_mask(config, p)))
