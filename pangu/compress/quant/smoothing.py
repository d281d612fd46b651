"""Smoothing plans: what each quantised linear's input becomes, X_hat = (X - z_g) / s, for HTG and the baselines.

HTG (Ding et al. 2025, spec 3.3-3.6):
  * per-step channel shift z_t = (max_n X_t + min_n X_t) / 2 (Eq. 2);
  * contiguous hierarchical grouping of the steps on z_t, group shift z_g = mean of z_t over the group (Eq. 4);
  * one channel scale per layer from an EMA over steps of the half-range r_t = max_n (X_t - z_t), from the
    noisiest step to the cleanest (alpha = 0.99), split SmoothQuant-style against the weights (Eq. 7):
    s = sqrt(m_1 / max_j |W[i, j]|) (`sqrt_weight`, R1) or s = m_1 / max(m_1) (`normalised`, R2). R1's split
    is SmoothQuant's with the migration strength fixed at 1/2; `HTGConfig.migration` opens it as SmoothQuant's is
    opened (our extension, not the paper's), so HTG's timestep-aware parts can be compared with SmoothQuant-style
    at the same split.
Baselines (time-agnostic, no shift, one group):
  * SmoothQuant-style (Xiao et al. 2023): s = (max over all steps of max|X|)^a / max|W|^(1 - a), with the
    migration strength a = 1/2 by default (the spec's form); like HTG's open constants, a and which inputs are
    scaled can be picked on calibration data (`pangu.compress.quant.select`);
  * PTQ4DiT-style channel balancing (our simplification): the salience of a channel is its max|X| averaged over
    steps rather than the worst step, s = sqrt(mean_t max|X_t| / max|W|).
"""

import dataclasses
from typing import Literal

import numpy as np

from pangu.compress.quant.grouping import contiguous_groups, default_n_groups, group_means
from pangu.config_checks import one_of
from pangu.models.dit import BLOCK_LINEARS

_MIN_SCALE = 1e-5  # keeps s and max|W| away from 0 on dead channels


@dataclasses.dataclass(frozen=True)
class SmoothingPlan:
  """One linear's smoothing: group_of_step int32 [S], shift [G, C_in], scale [C_in] (positive, so X_hat keeps
  the order of X and a channel's min and max stay its min and max)."""

  group_of_step: np.ndarray
  shift: np.ndarray
  scale: np.ndarray

  def __post_init__(self):
    if not np.all(np.asarray(self.scale) > 0):
      raise ValueError(f"SmoothingPlan.scale must be positive, got min {np.asarray(self.scale).min()}")

  def shift_per_step(self) -> np.ndarray:
    return self.shift[self.group_of_step]

  def on_steps(self, calibrated_of_step: np.ndarray) -> "SmoothingPlan":
    """The plan of calibrated steps read on every sampler step: step i takes the group of calibrated step
    calibrated_of_step[i] (spec 3.2: an uncalibrated step takes the group of its nearest calibrated one)."""
    return SmoothingPlan(self.group_of_step[calibrated_of_step], self.shift, self.scale)


def _check_layers(config) -> None:
  if unknown := sorted(set(config.scaled_layers) - set(BLOCK_LINEARS)):
    raise ValueError(f"{type(config).__name__}.scaled_layers has {unknown}, not among the block linears "
                     f"{BLOCK_LINEARS}")


def _check_migration(config) -> None:
  if not 0.0 < config.migration < 1.0:
    raise ValueError(f"{type(config).__name__}.migration must be in (0, 1), got {config.migration!r}")


@dataclasses.dataclass(frozen=True)
class HTGConfig:
  """Attributes:
    n_groups: G; None is max(1, S // 10) for S calibrated steps.
    alpha: EMA factor of the channel scale.
    scale: `sqrt_weight` (R1, default) or `normalised` (R2).
    migration: the exponent a of the `sqrt_weight` split, s = m_1^a / max|W|^(1 - a), in (0, 1). 1/2 is Eq. 7 as
      R1 has it (the spec, default); other values are our extension, SmoothQuant's migration strength.
    use_shift / use_scale: ablations (shift only: s = 1; scale only: z = 0).
    scaled_layers: the block linears whose inputs get the channel scale; the others keep the shift alone (s = 1).
      The spec scales all four (default); the paper does not say how the post-GELU fc2 input is handled, and
      at 4-bit weights its scale can cost more weight error than it saves (our choice, picked on calibration
      data by `pangu.compress.quant.select`).
    shift_compensation: which kernel the folded bias's shift term z_g W uses once the weights are rounded
      (`pangu.compress.quant.ptq`), i.e. what their rounding error acts on. `quantised` (default): the rounded
      kernel Q(W) the layer runs, so (X - z_g) Q(W) + z_g Q(W) = X Q(W): the shift cancels exactly, changes only
      what the activation quantiser sees, and the rounding error acts on X as without a shift. `float`: the
      spec's literal b + z_g W (the same function before rounding): the error acts on X - z_g, smaller where an
      input's mass sits near its midpoint z_g, larger where it is one-sided (after GELU most values are near 0
      and z_g far above them). Neither wins on every model; the paper does not say which order it uses (our
      choice, picked on calibration data with the others).
  """

  n_groups: int | None = None
  alpha: float = 0.99
  scale: Literal["sqrt_weight", "normalised"] = "sqrt_weight"
  migration: float = 0.5
  use_shift: bool = True
  use_scale: bool = True
  scaled_layers: tuple[str, ...] = BLOCK_LINEARS
  shift_compensation: Literal["quantised", "float"] = "quantised"

  def __post_init__(self):
    one_of(self, "scale", ("sqrt_weight", "normalised"))
    one_of(self, "shift_compensation", ("quantised", "float"))
    _check_layers(self)
    _check_migration(self)
    if self.migration != 0.5 and self.scale != "sqrt_weight":
      raise ValueError(f"HTGConfig.migration {self.migration!r} applies to the sqrt_weight split only, but scale is "
                       f"{self.scale!r}")
    if not 0.0 <= self.alpha < 1.0:
      raise ValueError(f"HTGConfig.alpha must be in [0, 1), got {self.alpha!r}")
    if self.n_groups is not None and (not isinstance(self.n_groups, int) or self.n_groups < 1):
      raise ValueError(f"HTGConfig.n_groups must be a positive int or None, got {self.n_groups!r}")


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig:
  """Attributes:
    migration: SmoothQuant's alpha, how much of an input's range moves into the weights, in (0, 1); 1/2 splits
      it evenly (the spec's baseline). Its paper tunes it per model, as HTG's open constants are tuned here.
    scaled_layers: the block linears whose inputs are smoothed; the others are left alone.
  """

  migration: float = 0.5
  scaled_layers: tuple[str, ...] = BLOCK_LINEARS

  def __post_init__(self):
    _check_layers(self)
    _check_migration(self)


def per_step_shift(stats: dict[str, np.ndarray]) -> np.ndarray:
  """z_t [S, C] (Eq. 2)."""
  return (np.asarray(stats["max"], np.float64) + np.asarray(stats["min"], np.float64)) / 2


def ema_from_noisy(per_step: np.ndarray, alpha: float) -> np.ndarray:
  """m after the cleanest step: m = r_0 at the noisiest step (index 0), m = alpha m + (1 - alpha) r_i after."""
  m = per_step[0]
  for r in per_step[1:]:
    m = alpha * m + (1 - alpha) * r
  return m


def weight_absmax(kernel: np.ndarray) -> np.ndarray:
  """max_j |W[i, j]| per input channel of a [C_in, C_out] kernel, clamped away from 0."""
  return np.maximum(np.max(np.abs(np.asarray(kernel, np.float64)), axis=1), _MIN_SCALE)


def htg_plan(stats: dict[str, np.ndarray], kernel: np.ndarray, config: HTGConfig) -> SmoothingPlan:
  """The HTG plan of one linear from its per-step input stats and its [C_in, C_out] kernel."""
  z_t = per_step_shift(stats)
  n_steps, channels = z_t.shape
  n_groups = default_n_groups(n_steps) if config.n_groups is None else min(config.n_groups, n_steps)
  groups = contiguous_groups(z_t, n_groups)
  shift = group_means(z_t, groups) if config.use_shift else np.zeros((n_groups, channels))
  if not config.use_shift:
    z_t = np.zeros_like(z_t)
  half_range = np.maximum(np.asarray(stats["max"], np.float64) - z_t, z_t - np.asarray(stats["min"], np.float64))
  m = np.maximum(ema_from_noisy(half_range, config.alpha), _MIN_SCALE)
  if not config.use_scale:
    scale = np.ones(channels)
  elif config.scale == "sqrt_weight":
    scale = split_scale(m, kernel, config.migration)
  else:
    scale = m / m.max()
  return SmoothingPlan(groups, shift, np.maximum(scale, _MIN_SCALE))


def channel_absmax(stats: dict[str, np.ndarray]) -> np.ndarray:
  """max|X| per step and channel, [S, C]."""
  return np.maximum(np.abs(np.asarray(stats["min"], np.float64)), np.abs(np.asarray(stats["max"], np.float64)))


def _scale_only(scale: np.ndarray, n_steps: int) -> SmoothingPlan:
  return SmoothingPlan(np.zeros(n_steps, np.int32), np.zeros((1, len(scale))), np.maximum(scale, _MIN_SCALE))


def split_scale(activation: np.ndarray, kernel: np.ndarray, migration: float) -> np.ndarray:
  """SmoothQuant's split (its Eq. 4), s = act^a / max|W|^(1 - a) per input channel: dividing the input by s and
  multiplying the kernel's rows by it moves the fraction a of the input's range (in log scale) into the weights."""
  return np.maximum(activation, _MIN_SCALE) ** migration / weight_absmax(kernel) ** (1 - migration)


def smoothquant_plan(stats: dict[str, np.ndarray], kernel: np.ndarray, migration: float = 0.5) -> SmoothingPlan:
  absmax = channel_absmax(stats)
  return _scale_only(split_scale(absmax.max(0), kernel, migration), absmax.shape[0])


def ptq4dit_plan(stats: dict[str, np.ndarray], kernel: np.ndarray) -> SmoothingPlan:
  absmax = channel_absmax(stats)
  return _scale_only(split_scale(absmax.mean(0), kernel, 0.5), absmax.shape[0])
