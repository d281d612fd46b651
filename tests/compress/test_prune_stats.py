"""Streamed co-moments equal float64 NumPy over all rows at once, whatever the batching and the offset."""

import jax.numpy as jnp
import numpy as np
import pytest

from pangu.compress.prune.stats import Comoment

BATCHES = (7, 64, 1, 28)


def _rows(rng, shape, offset):
  """float32 rows with a large common offset (the case raw float32 sums get wrong), as float64 for references."""
  return (rng.normal(size=(sum(BATCHES), *shape)) + offset).astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("spec,shape_a,shape_b", [
    ("ni,nj->ij", (5,), (5,)), ("nc,nc->c", (6,), (6,)), ("nhd,ngd->hgd", (3, 4), (3, 4)), ("ni,nd->id", (4,), (2,))])
def test_streamed_comoment_equals_numpy(spec, shape_a, shape_b):
  rng = np.random.default_rng(0)
  a, b = _rows(rng, shape_a, 50.0), _rows(rng, shape_b, -30.0)
  moments = Comoment(spec)
  start = 0
  for size in BATCHES:
    moments.add(jnp.asarray(a[start:start + size], jnp.float32), jnp.asarray(b[start:start + size], jnp.float32))
    start += size
  want = np.einsum(spec, a - a.mean(0), b - b.mean(0))
  assert moments.count == len(a)
  np.testing.assert_allclose(moments.mean_a, a.mean(0), rtol=1e-6)
  np.testing.assert_allclose(moments.mean_b, b.mean(0), rtol=1e-6)
  np.testing.assert_allclose(moments.comoment, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  np.testing.assert_allclose(moments.second_moment, np.einsum(spec, a, b) / len(a), rtol=1e-5)


def test_auto_moments_and_bad_specs():
  x = np.random.default_rng(1).normal(size=(20, 3))
  moments = Comoment("nc,nc->c")
  moments.add(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(moments.covariance, x.var(0), rtol=1e-5)
  with pytest.raises(ValueError, match="leading token axis"):
    Comoment("in,jn->ij")
  with pytest.raises(ValueError, match="no rows"):
    Comoment("nc,nc->c").covariance
