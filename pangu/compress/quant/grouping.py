"""Contiguous hierarchical clustering of sampler steps (HTG, Alg. 1): start with one cluster per step and
repeatedly merge the adjacent pair whose centroids (mean per-step shift vectors) are closest in squared L2,
until G clusters remain. Adjacent steps have similar activation distributions, so groups are intervals."""

import numpy as np


def contiguous_groups(vectors: np.ndarray, n_groups: int) -> np.ndarray:
  """vectors [S, C] in step order -> group id per step, int32 [S], ids 0..G-1 increasing along the steps.

  Ties go to the earliest pair. Cluster sums and sizes are kept, so each merge costs O(S C).
  """
  vectors = np.asarray(vectors, np.float64)
  n_steps = vectors.shape[0]
  if not 1 <= n_groups <= n_steps:
    raise ValueError(f"n_groups must be in [1, {n_steps}] (the number of steps), got {n_groups}")
  sums = [v.copy() for v in vectors]
  sizes = [1] * n_steps
  starts = list(range(n_steps))
  while len(sums) > n_groups:
    centroids = np.stack([s / n for s, n in zip(sums, sizes)])
    gaps = np.sum(np.square(centroids[1:] - centroids[:-1]), axis=1)
    j = int(np.argmin(gaps))
    sums[j] = sums[j] + sums.pop(j + 1)
    sizes[j] += sizes.pop(j + 1)
    starts.pop(j + 1)
  group_of_step = np.zeros(n_steps, np.int32)
  for g, start in enumerate(starts):
    group_of_step[start:] = g
  return group_of_step


def default_n_groups(n_steps: int) -> int:
  """G = max(1, T // 10) (spec 3.4)."""
  return max(1, n_steps // 10)


def group_means(per_step: np.ndarray, group_of_step: np.ndarray) -> np.ndarray:
  """[S, ...] -> [G, ...]: the mean over the steps of each group (Eq. 4)."""
  n_groups = int(group_of_step.max()) + 1
  return np.stack([per_step[group_of_step == g].mean(0) for g in range(n_groups)])


def common_refinement(*groupings: np.ndarray) -> np.ndarray:
  """Group ids of the intervals on which every given contiguous grouping is constant (at most sum G_i - n + 1)."""
  changes = np.zeros(len(groupings[0]), bool)
  for grouping in groupings:
    changes[1:] |= np.diff(grouping) != 0
  return np.cumsum(changes).astype(np.int32)


def collapse(per_step: np.ndarray, group_of_step: np.ndarray) -> np.ndarray:
  """[S, ...] values constant within each group -> [G, ...] (each group's first step)."""
  firsts = np.searchsorted(group_of_step, np.arange(int(group_of_step.max()) + 1))
  return per_step[firsts]


def uniform_steps(n_steps: int, n_calibrated: int | None) -> np.ndarray:
  """The sampler steps calibration reads: n_calibrated spread uniformly from the noisiest (0) to the cleanest
  (n_steps - 1), both included (R1 calibrates 25 of 100); None: every step."""
  if n_calibrated is None:
    return np.arange(n_steps)
  if not 1 <= n_calibrated <= n_steps:
    raise ValueError(f"calib_timesteps must be in [1, {n_steps}] (the sampler's steps), got {n_calibrated}")
  return np.round(np.linspace(0, n_steps - 1, n_calibrated)).astype(np.int64)  # spacing >= 1: distinct


def nearest_calibrated(calibrated: np.ndarray, n_steps: int) -> np.ndarray:
  """For every sampler step, the position in `calibrated` (sorted step indices) of the nearest calibrated step,
  ties to the noisier one. Monotone, so contiguous groups of calibrated steps stay contiguous on all steps."""
  distance = np.abs(np.arange(n_steps)[:, None] - np.asarray(calibrated)[None, :])
  return np.argmin(distance, axis=1).astype(np.int32)
