"""GPTQ weight rounding against the optimal brain surgeon's sequential form in float64 NumPy."""

import numpy as np
import pytest

from pangu.compress.quant.gptq import DAMPING, gptq_levels
from pangu.nn.quantized import quantise_symmetric, symmetric_scale


def _obs_rounding(kernel, hessian, bits, per_channel):
  """Rows rounded in order; after each, the rows left move by -H^-1[j, i] / H^-1[i, i] times its rounding error,
  and row i leaves H^-1 by a Schur complement (Frantar & Alistarh 2022): the update GPTQ reads off a Cholesky
  factor instead."""
  w = np.array(kernel, np.float64)
  h = np.array(hessian, np.float64) + DAMPING * np.mean(np.diag(hessian)) * np.eye(len(hessian))
  qmax = 2 ** (bits - 1) - 1
  scale = np.max(np.abs(w), axis=0 if per_channel else None, keepdims=True) / qmax
  inverse = np.linalg.inv(h)
  levels = np.zeros_like(w)
  for i in range(len(w)):
    levels[i] = np.clip(np.round(w[i] / scale[0]), -qmax, qmax)
    error = w[i] - levels[i] * scale[0]
    w[i + 1:] -= np.outer(inverse[i + 1:, i] / inverse[i, i], error)
    inverse = inverse - np.outer(inverse[:, i], inverse[i, :]) / inverse[i, i]
  return levels, scale


def _correlated_inputs(rng, rows=400, width=24):
  return rng.normal(size=(rows, width)) @ rng.normal(size=(width, width)) * 0.5 + rng.normal(size=width)


@pytest.mark.parametrize("bits, per_channel, seed", [(4, True, 0), (4, False, 1), (8, True, 2)])
def test_gptq_equals_the_sequential_obs_update(bits, per_channel, seed):
  rng = np.random.default_rng(seed)
  x, kernel = _correlated_inputs(rng), rng.normal(size=(24, 10))
  levels, scale = gptq_levels(kernel, x.T @ x, bits, per_channel)
  want_levels, want_scale = _obs_rounding(kernel, x.T @ x, bits, per_channel)
  np.testing.assert_allclose(scale, want_scale, rtol=1e-12)
  np.testing.assert_array_equal(levels, want_levels)
  assert np.all(np.abs(levels) <= 2 ** (bits - 1) - 1) and np.all(levels == np.round(levels))
  # What the updates are for: a lower output error on the inputs than rounding each weight to nearest.
  nearest = np.asarray(quantise_symmetric(kernel, symmetric_scale(kernel, bits, 0 if per_channel else None), bits))
  gptq_error = np.sum((x @ (kernel - levels * scale)) ** 2)
  nearest_error = np.sum((x @ (kernel - nearest * want_scale)) ** 2)
  assert gptq_error < 0.8 * nearest_error


def test_gptq_on_uncorrelated_inputs_rounds_to_nearest():
  """A diagonal H has nothing to pass an error on through, and a dead input (H_ii = 0) neither takes nor gives."""
  rng = np.random.default_rng(3)
  kernel = rng.normal(size=(6, 5)).astype(np.float32)
  hessian = np.diag([2.0, 0.5, 0.0, 3.0, 1.0, 0.0])
  levels, scale = gptq_levels(kernel, hessian, 4)
  want = quantise_symmetric(kernel, symmetric_scale(kernel, 4, 0), 4)
  np.testing.assert_array_equal(levels, want)
  np.testing.assert_allclose(scale, symmetric_scale(kernel, 4, 0), rtol=1e-6)


def test_gptq_names_mismatched_shapes():
  with pytest.raises(ValueError, match=r"kernel \[C_in, C_out\] and hessian \[C_in, C_in\]"):
    gptq_levels(np.ones((4, 3)), np.eye(3), 4)
