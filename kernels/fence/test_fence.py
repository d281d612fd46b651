"""The fences are identities (values and gradients), survive XLA:CPU's optimisation, and keep the fusions of a
residual stream's backward pass from growing with its depth."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu_kernels.fence import api, build

needs_kernel = pytest.mark.skipif(not build.register(), reason="the kernel does not build or run on this machine")
IMPLEMENTATIONS = [pytest.param("cpu", marks=needs_kernel), "barrier"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("value", [np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
                                   np.arange(7, dtype=np.int32), np.zeros((0, 3), np.float32),
                                   np.array([1.5, -2.25, 3.0], jnp.bfloat16)])
def test_fusion_fence_returns_its_input_bit_for_bit(implementation, value):
  fenced = jax.jit(lambda x: api.fusion_fence(x + 1, implementation=implementation) - 1)(value)
  assert fenced.dtype == value.dtype and fenced.shape == value.shape
  np.testing.assert_array_equal(np.asarray(fenced), value)
  batched = jax.vmap(lambda x: api.fusion_fence(x, implementation=implementation))(value)
  np.testing.assert_array_equal(np.asarray(batched), value)


def _residual_loss(fence: bool, implementation: str | None = None):
  """sum(x_L^2) of a LayerNorm-gated residual stream x_{i+1} = x_i + g_i * (LN(x_i) (1 + g_i)) W_i, the
  pattern of a DiT block, with the stream's cotangent fenced after every block or not."""
  def loss(ws, gates, x):
    for w, g in zip(ws, gates):
      h = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6) * (1 + g[:, None])
      x = x + g[:, None] * (h @ w)
      if fence:
        x = api.cotangent_fence(x, implementation)
    return jnp.sum(x * x)
  return loss


def _operands(depth: int):
  rng = np.random.default_rng(depth)
  ws = [rng.normal(0, 0.2, (32, 32)).astype(np.float32) for _ in range(depth)]
  gates = [rng.normal(0, 0.5, (8, 32)).astype(np.float32) for _ in range(depth)]
  return ws, gates, rng.normal(size=(8, 16, 32)).astype(np.float32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cotangent_fence_leaves_gradients_unchanged(implementation):
  operands = _operands(3)
  want = jax.jit(jax.grad(_residual_loss(False), argnums=(0, 1, 2)))(*operands)
  got = jax.jit(jax.grad(_residual_loss(True, implementation), argnums=(0, 1, 2)))(*operands)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _largest_fusion(depth: int, implementation: str) -> int:
  """Instructions in the largest fused computation of the compiled gradient."""
  grad = jax.jit(jax.grad(_residual_loss(True, implementation), argnums=(0, 1)))
  text = grad.lower(*_operands(depth)).compile().as_text()
  assert implementation != "cpu" or build.TARGET in text  # the custom call survives optimisation
  return max(len(body.splitlines()) for body in re.findall(r"\n%fused[^\n]*\{\n(.*?)\n\}", text, re.S))


@needs_kernel
def test_fenced_fusions_do_not_grow_with_depth():
  # Unfenced (or with the barrier, which XLA:CPU strips) the largest fusion recomputes the stream's cotangent
  # from the last block: 125 instructions at depth 4, 265 at depth 8 with jax 0.10.
  assert jax.default_backend() == "cpu"
  assert _largest_fusion(4, "cpu") == _largest_fusion(8, "cpu")


def test_unknown_implementation_is_named():
  with pytest.raises(ValueError, match="'gpu'"):
    api.fusion_fence(jnp.ones(3), implementation="gpu")
