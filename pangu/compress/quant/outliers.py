"""Does a linear's input have time-dependent, channel-specific outliers? HTG's premise (its abstract), measured
from the per-step channel min / max that calibration collects (`calibration.collect_input_stats`).

Two numbers per linear, each near 1 where the premise is absent:
  * outlier ratio: at one step, the largest channel's max|X| over the median channel's; the linear's is the
    median over steps. Gaussian channels of one spread give 1.3-1.45 at 1024-4096 rows and 48-512 channels; a
    large ratio is what per-tensor activation ranges pay for and what the channel scale s moves into the weights.
  * time spread: of the strongest channels (by max|X| over all steps), the interval [min, max] pooled over every
    step against the width of one step's own interval (median over steps, then over those channels). 1 when
    every step fills the same interval; large when the interval moves or grows with t, which one time-agnostic
    range (and no per-step shift) pays for and HTG's grouped shifts and ranges remove.
"""

import numpy as np

from pangu.compress.quant.smoothing import channel_absmax

TOP_FRACTION = 0.01  # the strongest channels whose time spread is read (at least one)


def outlier_ratio(stats: dict[str, np.ndarray]) -> float:
  """Median over steps of max_i max|X_t[:, i]| / median_i max|X_t[:, i]| for stats {"min", "max": [S, C]}."""
  _check(stats)
  absmax = channel_absmax(stats)
  median = np.maximum(np.median(absmax, axis=1), np.finfo(np.float64).tiny)
  return float(np.median(absmax.max(axis=1) / median))


def time_spread(stats: dict[str, np.ndarray], top_fraction: float = TOP_FRACTION) -> float:
  """Median over the top max(1, round(top_fraction C)) channels by max|X| over all steps of (the channel's interval
  pooled over steps) / (the median over steps of its width at one step)."""
  if not 0 < top_fraction <= 1:
    raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
  _check(stats)
  low, high = (np.asarray(stats[name], np.float64) for name in ("min", "max"))
  n_top = max(1, round(top_fraction * low.shape[1]))
  top = np.argsort(channel_absmax(stats).max(axis=0))[-n_top:]
  pooled = high[:, top].max(axis=0) - low[:, top].min(axis=0)
  per_step = np.median(high[:, top] - low[:, top], axis=0)
  return float(np.median(pooled / np.maximum(per_step, np.finfo(np.float64).tiny)))


def _check(stats: dict[str, np.ndarray]) -> None:
  low, high = np.shape(stats["min"]), np.shape(stats["max"])
  if low != high or len(low) != 2:
    raise ValueError(f"stats must hold 'min' and 'max' of one shape [steps, channels], got {low} and {high}")
