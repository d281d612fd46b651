"""Output recovery fits against float64 NumPy: np.polyfit per channel (the authors' code), np.linalg.lstsq and
the closed-form ridge solution."""

import jax.numpy as jnp
import numpy as np
import pytest

from pangu.compress.prune import recovery
from pangu.compress.prune.stats import Comoment

N, P, D = 200, 6, 4


def _data(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda a: a.astype(np.float32).astype(np.float64)
  z = f32(rng.normal(size=(N, P)) * rng.uniform(0.5, 3, P) + rng.normal(size=P) * 4)
  y = f32(z @ rng.normal(size=(P, D)) + 0.3 * rng.normal(size=(N, D)) + 2.0)
  return z, y


def _stream(spec, a, b=None):
  moments = Comoment(spec)
  for rows in np.array_split(np.arange(len(a)), 3):
    moments.add(jnp.asarray(a[rows], jnp.float32), None if b is None else jnp.asarray(b[rows], jnp.float32))
  return moments


@pytest.mark.parametrize("bias", [True, False])
def test_least_squares_equals_numpy_lstsq(bias):
  z, y = _data()
  weights, offset = recovery.least_squares(_stream("ni,nj->ij", z), _stream("ni,nd->id", z, y), bias, ridge=0.0)
  design = np.concatenate([z, np.ones((N, 1))], axis=1) if bias else z
  want = np.linalg.lstsq(design, y, rcond=None)[0]
  np.testing.assert_allclose(weights, want[:P], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(offset, want[P] if bias else np.zeros(D), rtol=1e-4, atol=1e-4)


def test_ridge_equals_the_closed_form():
  z, y = _data(1)
  ridge = 0.1
  weights, offset = recovery.least_squares(_stream("ni,nj->ij", z), _stream("ni,nd->id", z, y), True, ridge)
  zc, yc = z - z.mean(0), y - y.mean(0)
  gram = zc.T @ zc / N
  want = np.linalg.solve(gram + ridge * np.trace(gram) / P * np.eye(P), zc.T @ yc / N)
  np.testing.assert_allclose(weights, want, rtol=1e-4)
  np.testing.assert_allclose(offset, y.mean(0) - z.mean(0) @ want, rtol=1e-4)


def _channel_moments(x, y):
  return recovery.ChannelMoments.from_pairs(_stream("nd,nd->d", x, y), _stream("nd,nd->d", x))


def test_channel_affine_equals_polyfit_and_guards_constant_channels():
  z, y = _data(2)
  x = z[:, :D].copy()
  x[:, 1] = 3.0  # a constant pruned output: A = 0, B = mean(y)
  scale, shift = recovery.channel_fit(_channel_moments(x, y), "channel_affine", bias=True)
  for d in (0, 2, 3):
    a, b = np.polyfit(x[:, d], y[:, d], 1)
    np.testing.assert_allclose([scale[d], shift[d]], [a, b], rtol=1e-4)
  assert scale[1] == 0
  np.testing.assert_allclose(shift[1], y[:, 1].mean(), rtol=1e-6)


def test_channel_fit_without_intercept_and_mean_shift():
  z, y = _data(3)
  x = z[:, :D]
  scale, shift = recovery.channel_fit(_channel_moments(x, y), "channel_affine", bias=False)
  np.testing.assert_allclose(scale, (x * y).sum(0) / (x * x).sum(0), rtol=1e-4)
  assert not shift.any()
  scale, shift = recovery.channel_fit(_channel_moments(x, y), "mean_shift", bias=True)
  assert (scale == 1).all()
  np.testing.assert_allclose(shift, (y - x).mean(0), rtol=1e-4)
