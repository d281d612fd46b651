"""The top-k kernel against a stable NumPy sort and lax.top_k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu_kernels.topk import api

needs_kernel = pytest.mark.skipif(not api.kernel_registered(), reason="top_k.cc does not build or run here")


def _numpy_top_k(x: np.ndarray, k: int) -> np.ndarray:
  return np.argsort(-x, axis=-1, kind="stable")[..., :k]  # largest first, ties in index order


@needs_kernel
@pytest.mark.parametrize("shape,k", [((3, 4096), 64), ((2, 5, 37), 37), ((4, 9), 1), ((1, 1000), 999)])
def test_kernel_matches_a_stable_sort(shape, k):
  rng = np.random.default_rng(k)
  x = rng.normal(size=shape).astype(np.float32)
  x[..., ::7] = np.round(x[..., ::7])  # repeated values: ties keep index order
  x[..., 3::11] = -np.inf  # masked entries, as SpeCache's non-candidates
  got = jax.jit(lambda a: api.top_k_indices(a, k, implementation="cpu"))(jnp.asarray(x))
  np.testing.assert_array_equal(got, _numpy_top_k(x, k))
  want_values = jax.lax.top_k(jnp.asarray(x), k)[0]  # lax.top_k orders tied -infs its own way: values agree
  np.testing.assert_array_equal(np.take_along_axis(x, np.asarray(got), axis=-1), want_values)


@needs_kernel
def test_ascending_input_gives_the_last_entries():
  x = np.arange(2000, dtype=np.float32)[None]  # the top k share their blocks of eight: the threshold is exact
  np.testing.assert_array_equal(api.top_k_indices(jnp.asarray(x), 10, implementation="cpu"), x[:, ::-1][:, :10])


def test_bad_arguments_are_refused():
  x = jnp.zeros((2, 8))
  with pytest.raises(ValueError, match="k=9 must be in"):
    api.top_k_indices(x, 9)
  with pytest.raises(ValueError, match="implementation must be one of"):
    api.top_k_indices(x, 2, implementation="gpu")
  if jax.default_backend() == "cpu" and api.kernel_registered():
    with pytest.raises(ValueError, match="float32"):
      api.top_k_indices(x.astype(jnp.bfloat16), 2, implementation="cpu")
