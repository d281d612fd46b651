"""The AVX2 skinny-matmul kernel against float64 NumPy, and the dispatcher's choice of kernel or XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu_kernels import skinny_matmul as api
from pangu_kernels.skinny_matmul import build

needs_kernel = pytest.mark.skipif(not build.register(), reason="the kernel does not build or run on this machine")


def _operands(rows, k, n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(*rows, k)).astype(np.float32), rng.normal(size=(n, k)).astype(np.float32)


@needs_kernel
@pytest.mark.parametrize("rows,k,n", [
    # Every tail: rows not a multiple of the 4-row block, columns not of the 3-column block, K not of 8.
    ((1,), 13, 7), ((3,), 8, 3), ((4,), 16, 6), ((5,), 21, 10), ((2, 4), 512, 1408), ((13,), 1408, 512),
    ((2, 3, 5), 64, 1000),
])
def test_kernel_matches_float64_on_every_tail(rows, k, n):
  x, w = _operands(rows, k, n)
  got = jax.jit(lambda x, w: api.skinny_matmul(x, w, implementation="cpu"))(x, w)
  want = np.einsum("...k,nk->...n", x.astype(np.float64), w.astype(np.float64))
  assert got.shape == (*rows, n) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@needs_kernel
def test_columns_split_over_the_thread_pool_give_the_single_thread_result():
  # 8192 x 512 floats = 16 MiB: split into chunks on XLA's intra-op pool when it has several threads.
  x, w = _operands((8,), 512, 8192, seed=1)
  got = np.asarray(jax.jit(lambda x, w: api.skinny_matmul(x, w, implementation="cpu"))(x, w))
  columns = [np.asarray(api.skinny_matmul(x, w[i:i + 100], implementation="cpu")) for i in range(0, 8192, 100)]
  np.testing.assert_array_equal(got, np.concatenate(columns, axis=1))  # the same sums, in the same order


def _uses_kernel(x, w) -> bool:
  return build.TARGET in jax.jit(api.skinny_matmul).lower(x, w).as_text()


def test_dispatcher_takes_the_kernel_for_few_float32_rows_only():
  x, w = _operands((8,), 64, 32)
  assert _uses_kernel(x, w) == build.register()
  assert not _uses_kernel(x[:1], w)  # a matrix-vector product: XLA streams it as fast
  assert not _uses_kernel(np.zeros((api.MAX_ROWS + 1, 64), np.float32), w)
  assert not _uses_kernel(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  np.testing.assert_allclose(api.skinny_matmul(x, w), x @ w.T, rtol=1e-5, atol=1e-5)


def test_bad_calls_are_named():
  x, w = _operands((8,), 64, 32)
  with pytest.raises(ValueError, match=r"must be \[..., K\] and \[N, K\]"):
    api.skinny_matmul(x, w[:, :63])
  with pytest.raises(ValueError, match="implementation must be one of"):
    api.skinny_matmul(x, w, implementation="avx512")
  with pytest.raises(ValueError, match="takes float32"):
    api.skinny_matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), implementation="cpu")
