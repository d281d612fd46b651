"""The low-bit scoring kernel (interpreted on CPU) against its reference and a float64 NumPy dequantisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu_kernels.specache import api, pallas, reference


def _random_lowbit(rng, b, k, t, dh, bits, group):
  codes = rng.integers(0, 1 << bits, size=(b, k, t, dh))
  scale = rng.uniform(0.1, 1.0, size=(b, k, t // group, dh))
  zero = rng.normal(size=(b, k, t // group, dh))
  return codes, scale, zero


@pytest.mark.parametrize("bits", [1, 2])
def test_pack_round_trips_and_uses_bits_over_eight_of_a_byte_per_code(bits):
  codes = np.random.default_rng(bits).integers(0, 1 << bits, size=(3, 5, 64))
  packed = reference.pack_bits(jnp.asarray(codes), bits)
  assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, 64 * bits // 8)
  np.testing.assert_array_equal(reference.unpack_bits(packed, bits), codes)


@pytest.mark.parametrize("bits,group,block", [(1, 32, 64), (2, 64, 128), (2, 32, 32)])
def test_interpreted_kernel_matches_reference_and_float64_dequantisation(bits, group, block):
  rng = np.random.default_rng(7)
  b, k, g_heads, t, dh = 2, 2, 4, 256, 32
  codes, scale, zero = _random_lowbit(rng, b, k, t, dh, bits, group)
  q = rng.normal(size=(b, k, g_heads, dh))
  packed = reference.pack_bits(jnp.asarray(codes), bits)
  args = (jnp.asarray(q, jnp.float32), packed, jnp.asarray(scale, jnp.float32), jnp.asarray(zero, jnp.float32))
  got = pallas.lowbit_scores(*args, bits=bits, block_tokens=block, interpret=True)
  want = reference.lowbit_scores(*args, bits=bits)
  keys = codes * np.repeat(scale, group, axis=2) + np.repeat(zero, group, axis=2)
  exact = np.einsum("bkgd,bktd->bkgt", q, keys) / np.sqrt(dh)
  np.testing.assert_allclose(want, exact, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-4)


def test_kernel_refuses_a_block_that_splits_a_group():
  q = jnp.zeros((1, 1, 2, 32))
  with pytest.raises(ValueError, match="multiple of the group size"):
    pallas.lowbit_scores(q, jnp.zeros((1, 1, 128, 4), jnp.uint8), jnp.zeros((1, 1, 2, 32)), jnp.zeros((1, 1, 2, 32)),
                         bits=1, block_tokens=32, interpret=True)


def test_implementation_resolves_to_the_reference_where_the_kernel_does_not_compile():
  assert api.resolve_implementation(None, 96, 64) == "xla"  # a block of 96 tokens splits a group of 64
  if jax.default_backend() == "cpu":  # the test tier's backend: Pallas does not compile there
    assert api.resolve_implementation(None, 256, 32) == "xla"
  assert api.resolve_implementation("pallas_interpret", 256, 32) == "pallas_interpret"  # asked for: kept
  with pytest.raises(ValueError, match="implementation must be one of"):
    api.resolve_implementation("triton", 256, 32)
