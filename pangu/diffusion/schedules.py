"""Noise schedules: alpha_bar(t) = prod_{s <= t} (1 - beta_s) over t = 0..T-1 (Ho et al. 2020; Nichol &
Dhariwal 2021 for the cosine form)."""

import dataclasses
from typing import Literal

import jax.numpy as jnp
import numpy as np

from pangu.config_checks import one_of, positive_ints

ScheduleKind = Literal["linear", "cosine"]


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Attributes:
    n_timesteps: T, training noise levels.
    kind: `linear` betas from beta_start to beta_end, or `cosine` alpha_bar.
    beta_start, beta_end: the linear schedule's end points (DDPM's 1e-4 and 0.02).
  """

  n_timesteps: int = 1000
  kind: ScheduleKind = "linear"
  beta_start: float = 1e-4
  beta_end: float = 0.02

  def __post_init__(self):
    positive_ints(self, "n_timesteps")
    one_of(self, "kind", ("linear", "cosine"))
    if not 0 < self.beta_start < self.beta_end < 1:
      raise ValueError(f"ScheduleConfig: need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")


def alpha_bars(config: ScheduleConfig) -> jnp.ndarray:
  """alpha_bar_t for t = 0..T-1, float32 [T], computed in float64."""
  t = config.n_timesteps
  if config.kind == "linear":
    betas = np.linspace(config.beta_start, config.beta_end, t, dtype=np.float64)
  else:
    s = 0.008
    f = np.cos((np.arange(t + 1) / t + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
  return jnp.asarray(np.cumprod(1 - betas), jnp.float32)
