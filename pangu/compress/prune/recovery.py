"""Output recovery: refit a pruned output projection (`o` or `down`) to reproduce the unpruned output on the
calibration tokens, in closed form from streamed statistics (pangu.compress.prune.stats).

With x the pruned sublayer output before correction and y the unpruned one (both without the projection's old
bias, which is added back):
  channel_affine: per output channel d, least squares y_d ~ A_d x_d + B_d (SlimLLM, spec 3.6; the authors' code
                  runs np.polyfit(x_d, y_d, 1)): A_d = Cov(x_d, y_d) / Var(x_d), B_d = mean y_d - A_d mean x_d.
                  The kernel's columns are scaled by A and B becomes (part of) a new bias. A constant x_d gives
                  A_d = 0, B_d = mean y_d.
  mean_shift:     A = 1, B = mean(y - x): the removed channels' mean contribution (FLAP's bias compensation).
  lstsq:          the whole kept kernel refit, min_W,b ||y - z W - b||^2 + lambda ||W||^2 over the kept input
                  channels z, lambda = ridge * mean diagonal of Cov(z).
Without an intercept (recovery_bias=False) the same fits use uncentred moments and B = 0.
"""

import dataclasses

import numpy as np

from pangu.compress.prune.stats import Comoment


@dataclasses.dataclass(frozen=True)
class ChannelMoments:
  """Per-output-channel statistics of x (pruned output) and y (unpruned output): [D] each, float64."""

  mean_x: np.ndarray
  mean_y: np.ndarray
  var_x: np.ndarray
  cov_xy: np.ndarray

  @classmethod
  def from_pairs(cls, xy: Comoment, xx: Comoment) -> "ChannelMoments":
    """From the per-channel Comoments "nd,nd->d" of (x, y) and of (x, x)."""
    return cls(mean_x=xy.mean_a, mean_y=xy.mean_b, var_x=xx.covariance, cov_xy=xy.covariance)


def channel_fit(moments: ChannelMoments, recovery: str, bias: bool) -> tuple[np.ndarray, np.ndarray]:
  """(A, B), each [D], of y_d ~ A_d x_d + B_d for `channel_affine` or `mean_shift` (see the module docstring)."""
  if recovery == "mean_shift":
    return np.ones_like(moments.mean_x), moments.mean_y - moments.mean_x
  if recovery != "channel_affine":
    raise ValueError(f"channel_fit handles 'channel_affine' and 'mean_shift', got {recovery!r}")
  if bias:
    var, cov = moments.var_x, moments.cov_xy
  else:  # through the origin: E[x y] / E[x^2]
    var = moments.var_x + moments.mean_x ** 2
    cov = moments.cov_xy + moments.mean_x * moments.mean_y
  scale = np.divide(cov, var, out=np.zeros_like(cov), where=var > 1e-12 * max(var.max(), np.finfo(np.float64).tiny))
  shift = moments.mean_y - scale * moments.mean_x if bias else np.zeros_like(scale)
  return scale, shift


def least_squares(inputs: Comoment, cross: Comoment, bias: bool, ridge: float) -> tuple[np.ndarray, np.ndarray]:
  """(W [p, D], b [D]) minimising ||y - z W - b||^2 + lambda ||W||^2 (b = 0 without `bias`).

  inputs: the Comoment "ni,nj->ij" of z [n, p] with itself; cross: "ni,nd->id" of z and y [n, D].
  """
  if bias:
    gram, rhs = inputs.covariance, cross.covariance
  else:
    gram, rhs = inputs.second_moment, cross.second_moment
  lam = ridge * np.trace(gram) / len(gram)
  weights = np.linalg.lstsq(gram + lam * np.eye(len(gram)), rhs, rcond=None)[0]
  offset = cross.mean_b - inputs.mean_a @ weights if bias else np.zeros(rhs.shape[1])
  return weights, offset
