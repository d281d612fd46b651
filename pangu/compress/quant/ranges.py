"""Activation range estimators (spec 3.8): the (lo, hi) a static per-tensor asymmetric quantiser covers, read from
a histogram of a layer's input values over a group of steps.

  * `minmax` (default): the group's extremes; nothing is clipped (needs no histogram);
  * `percentile`: the (100 - p)-th and p-th percentiles, rounded outwards to bin edges;
  * `mse`: of the extremes scaled toward 0 by factors c in [0.2, 1], the range with the least squared
    quantisation error (clipping and rounding) over the histogram, each bin's mass at its centre.
Both clipping estimators stay inside the extremes, so they only ever narrow the min-max grid.
"""

from collections.abc import Callable
from typing import Literal

import jax.numpy as jnp
import numpy as np

from pangu.nn.quantized import fake_quant_activation

RangeEstimator = Literal["minmax", "percentile", "mse"]
ESTIMATORS = ("minmax", "percentile", "mse")
SHRINK_FACTORS = np.linspace(1.0, 0.2, 81)  # widest first, so a tie keeps the least clipping

# (counts [bins] over bounds (lo, hi), the group's extremes (lo, hi)) -> the quantiser's (lo, hi)
Estimate = Callable[[np.ndarray, tuple[float, float], tuple[float, float]], tuple[float, float]]


def bin_centres(n_bins: int, bounds: tuple[float, float]) -> np.ndarray:
  lo, hi = bounds
  return lo + (np.arange(n_bins) + 0.5) * (hi - lo) / n_bins


def percentile_range(counts: np.ndarray, bounds: tuple[float, float], extremes: tuple[float, float],
                     percentile: float) -> tuple[float, float]:
  counts = np.asarray(counts, np.float64)
  lo, hi = bounds
  width = (hi - lo) / len(counts)
  cdf = np.cumsum(counts) / counts.sum()
  first = int(np.searchsorted(cdf, 1 - percentile / 100, side="left"))
  last = min(int(np.searchsorted(cdf, percentile / 100, side="left")), len(counts) - 1)
  return max(lo + first * width, extremes[0]), min(lo + (last + 1) * width, extremes[1])


def mse_range(counts: np.ndarray, bounds: tuple[float, float], extremes: tuple[float, float],
              bits: int) -> tuple[float, float]:
  centres = bin_centres(len(counts), bounds)
  lows, highs = min(extremes[0], 0.0) * SHRINK_FACTORS, max(extremes[1], 0.0) * SHRINK_FACTORS
  quantised = np.asarray(fake_quant_activation(jnp.asarray(centres[None, :], jnp.float32),
                                               jnp.asarray(lows[:, None], jnp.float32),
                                               jnp.asarray(highs[:, None], jnp.float32), bits), np.float64)
  errors = np.sum(np.asarray(counts, np.float64) * np.square(quantised - centres), axis=1)
  best = int(np.argmin(errors))
  return max(lows[best], extremes[0]), min(highs[best], extremes[1])


def range_estimator(name: RangeEstimator, percentile: float, bits: int) -> Estimate | None:
  """The estimator `name` (None for min-max, which reads no histogram)."""
  if name == "minmax":
    return None
  if name == "percentile":
    return lambda counts, bounds, extremes: percentile_range(counts, bounds, extremes, percentile)
  if name == "mse":
    return lambda counts, bounds, extremes: mse_range(counts, bounds, extremes, bits)
  raise ValueError(f"range estimator must be one of {ESTIMATORS}, got {name!r}")
