"""The DDPM training objective (epsilon prediction, Ho et al. 2020, Eq. 14) as a loss function
`loss(params, batch, rng) -> (loss, metrics)`, with label dropout for classifier-free guidance."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pangu.diffusion.schedules import ScheduleConfig, alpha_bars
from pangu.models.dit import DiT, DiTConfig

DiffusionLoss = Callable[[dict, dict, jax.Array], tuple[jax.Array, dict]]


def noise_images(images: jax.Array, noise: jax.Array, alpha_bar_t: jax.Array) -> jax.Array:
  """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, alpha_bar_t [B]."""
  a = alpha_bar_t[:, None, None, None]
  return jnp.sqrt(a) * images + jnp.sqrt(1 - a) * noise


def ddpm_loss(model_config: DiTConfig, schedule: ScheduleConfig) -> DiffusionLoss:
  """Batch {"images": [B, H, W, C] in [-1, 1], "labels": int [B]} -> mean squared error of the predicted noise."""
  model = DiT(model_config)
  bars = alpha_bars(schedule)

  def loss(params, batch, rng):
    images, labels = batch["images"], batch["labels"]
    t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
    t = jax.random.randint(t_rng, labels.shape, 0, schedule.n_timesteps)
    noise = jax.random.normal(noise_rng, images.shape)
    dropped = jax.random.bernoulli(drop_rng, model_config.label_dropout, labels.shape)
    labels = jnp.where(dropped, model_config.n_classes, labels)
    predicted = model.apply({"params": params}, noise_images(images, noise, bars[t]), t, labels)
    mse = jnp.mean(jnp.square(predicted - noise))
    return mse, {"mse": mse}

  return loss
