"""HTG's premise, measured: the outlier ratio and time spread of a linear's input against closed forms and a
float64 loop over raw per-step values."""

import statistics

import numpy as np
import pytest

from pangu.compress.quant.outliers import outlier_ratio, time_spread


def _stats(values: np.ndarray) -> dict[str, np.ndarray]:
  """values [S, N, C] -> the per-step channel min / max calibration collects."""
  return {"min": values.min(axis=1), "max": values.max(axis=1)}


def test_outlier_ratio_closed_form():
  """Channel magnitudes [1, 1, 2, 10] at every step scaled by the step's own factor: the largest over the median
  (1.5) is 10 / 1.5 whatever the factors; with one step's outlier at 2, the median over three steps still is."""
  magnitude = np.array([1.0, 1.0, 2.0, 10.0])
  factors = np.array([0.1, 1.0, 7.0])[:, None]
  stats = {"min": -magnitude * factors, "max": 0.5 * magnitude * factors}
  assert outlier_ratio(stats) == pytest.approx(10 / 1.5)
  stats["max"][1, 3] = stats["min"][1, 3] = 2.0
  assert outlier_ratio(stats) == pytest.approx(10 / 1.5)
  equal = {"min": -np.ones((4, 8)), "max": np.ones((4, 8))}
  assert outlier_ratio(equal) == pytest.approx(1.0)


def test_time_spread_closed_form():
  """The strongest channel's interval [t, t + 1] at step t of S: pooled width S, one step's width 1. A channel
  holding one interval at every step gives 1; one whose interval grows as [-w_t, w_t] gives max w / median w."""
  steps = 7
  t = np.arange(steps, dtype=np.float64)
  moving = {"min": np.stack([t, -np.ones(steps)], 1), "max": np.stack([t + 1, 0.5 * np.ones(steps)], 1)}
  assert time_spread(moving, top_fraction=0.5) == pytest.approx(steps)
  still = {"min": np.stack([t, -50 * np.ones(steps)], 1), "max": np.stack([t + 1, 50 * np.ones(steps)], 1)}
  assert time_spread(still, top_fraction=0.5) == pytest.approx(1.0)  # the strongest channel never moves
  width = t + 1
  growing = {"min": -width[:, None], "max": width[:, None]}
  assert time_spread(growing) == pytest.approx(width.max() / np.median(width))


def test_outlier_measures_match_a_float64_loop_over_raw_values():
  """Heavy-tailed channels whose centres drift with the step, read from raw values with Python loops."""
  rng = np.random.default_rng(0)
  steps, rows, channels = 9, 50, 300
  spread = np.exp(rng.normal(size=channels))
  drift = np.linspace(0, 3, steps)[:, None] * rng.normal(size=channels)
  values = rng.standard_t(3, size=(steps, rows, channels)) * spread + drift[:, None, :]
  per_step = []
  for s in range(steps):
    absmax = [max(abs(v) for v in values[s, :, c]) for c in range(channels)]
    per_step.append(max(absmax) / statistics.median(absmax))
  assert outlier_ratio(_stats(values)) == pytest.approx(statistics.median(per_step), rel=1e-12)
  strongest = sorted(range(channels), key=lambda c: np.abs(values[:, :, c]).max())[-3:]  # 1 % of 300
  ratios = []
  for c in strongest:
    pooled = values[:, :, c].max() - values[:, :, c].min()
    ratios.append(pooled / statistics.median([values[s, :, c].max() - values[s, :, c].min() for s in range(steps)]))
  assert time_spread(_stats(values)) == pytest.approx(statistics.median(ratios), rel=1e-12)


def test_bad_stats_and_fraction_named():
  with pytest.raises(ValueError, match="one shape"):
    outlier_ratio({"min": np.zeros((3, 4)), "max": np.zeros((3, 5))})
  with pytest.raises(ValueError, match="one shape"):
    time_spread({"min": np.zeros(4), "max": np.zeros(4)})
  with pytest.raises(ValueError, match="top_fraction"):
    time_spread({"min": np.zeros((3, 4)), "max": np.ones((3, 4))}, top_fraction=0.0)
