"""A plain optax loop for the small DiTs of the diffusion experiments.

Why not pangu.train.step.make_train_step: that step builds and shards a `Decoder` train state (its init, its
per-decoder-layer gradient norms, the mesh shardings of an LM batch); a DiT on 8x8 digits trains on one CPU device
in a minute, and giving the shared step a model-agnostic init would change every existing caller. The objective is
still an injected loss of the same contract, `loss(params, batch, rng) -> (loss, metrics)`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pangu.config_checks import positive_ints
from pangu.diffusion.objective import DiffusionLoss


@dataclasses.dataclass(frozen=True)
class DiffusionTrainConfig:
  """Attributes: steps, batch_size, peak learning_rate (cosine decay after warmup_steps), ema_decay of the
  weights kept for sampling (0 disables), grad_clip (global norm)."""

  steps: int = 2000
  batch_size: int = 128
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  ema_decay: float = 0.999
  grad_clip: float = 1.0

  def __post_init__(self):
    positive_ints(self, "steps", "batch_size", "warmup_steps")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"DiffusionTrainConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")


def train_diffusion(config: DiffusionTrainConfig, loss_fn: DiffusionLoss, params: dict, images: np.ndarray,
                    labels: np.ndarray, rng: jax.Array, log_every: int = 0) -> tuple[dict, list[float]]:
  """Trains on batches drawn with replacement; returns (EMA params, loss per step)."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps, config.steps)
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adamw(schedule, weight_decay=0.0))
  opt_state = tx.init(params)
  images, labels = jnp.asarray(images), jnp.asarray(labels)

  @jax.jit
  def step(params, ema, opt_state, key, index):
    idx_key, loss_key = jax.random.split(key)
    idx = jax.random.randint(idx_key, (config.batch_size,), 0, images.shape[0])
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, {"images": images[idx], "labels": labels[idx]}, loss_key)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # The usual warm-up of the EMA decay, so the average forgets the random init within a short run.
    decay = jnp.minimum(config.ema_decay, (1.0 + index) / (10.0 + index))
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    return params, ema, opt_state, loss

  ema, losses = params, []
  for i, key in enumerate(jax.random.split(rng, config.steps)):
    params, ema, opt_state, loss = step(params, ema, opt_state, key, i)
    losses.append(loss)
    if log_every and (i + 1) % log_every == 0:
      print(f"diffusion step {i + 1}: loss {float(loss):.4f}", flush=True)
  return (ema if config.ema_decay else params), [float(v) for v in losses]
