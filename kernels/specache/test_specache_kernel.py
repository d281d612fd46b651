"""The low-bit kernels (Pallas interpreted on CPU, the FFI kernel in both builds) against their references and
float64 NumPy."""

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


needs_cpu_kernel = pytest.mark.skipif(not api.cpu_kernel_registered(),
                                      reason="the lowbit kernel does not build or run on this machine")
# Both builds where they run: `cpu` (AVX-512's masks for 1-bit codes where the CPU has them) and `cpu_avx2`.
CPU_BUILDS = [pytest.param(name, marks=pytest.mark.skipif(not api.cpu_kernel_registered(name),
                                                          reason=f"lowbit {name} does not build or run here"))
              for name in ("cpu", "cpu_avx2")]


@pytest.mark.parametrize("implementation", CPU_BUILDS)
@pytest.mark.parametrize("bits,dh,group,value_group,rows", [
    (1, 128, 64, 64, 4),  # the vector path: whole 8-byte blocks, value groups of 8k channels
    (2, 64, 32, 32, 5),   # rows past one block of 4
    (1, 32, 16, 8, 3),    # 4 bytes a row: the 4-byte (SSE) path
    (2, 48, 16, 16, 2),   # 12 bytes: scores in 8 + 4, values in 4-byte blocks (8 would straddle a value group)
    (2, 16, 8, 4, 1),     # value groups of 4 channels
    (1, 16, 8, 2, 2),     # 2 bytes a row, value groups of 2: the scalar paths
    (4, 64, 16, 16, 2),   # two slots a byte: values one slot per pass (kPerPass does not divide)
])
def test_cpu_kernels_match_float64_numpy(implementation, bits, dh, group, value_group, rows):
  rng = np.random.default_rng(bits * dh)
  b, k, t = 2, 3, 4 * group
  codes, scale, zero = _random_lowbit(rng, b, k, t, dh, bits, group)
  values = rng.integers(0, 1 << bits, size=(b, k, t, dh))
  v_scale = rng.uniform(0.1, 1.0, size=(b, k, t, dh // value_group))
  v_zero = rng.normal(size=(b, k, t, dh // value_group))
  q = rng.normal(size=(b, k, rows, dh))
  probs = rng.dirichlet(np.ones(t), size=(b, k, rows))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  pack = lambda c: reference.pack_bits(jnp.asarray(c), bits)

  scores = api.lowbit_scores(f32(q), pack(codes), f32(scale), f32(zero), bits=bits, implementation=implementation)
  keys = codes * np.repeat(scale, group, axis=2) + np.repeat(zero, group, axis=2)
  np.testing.assert_allclose(scores, np.einsum("bkgd,bktd->bkgt", q, keys) / np.sqrt(dh), rtol=1e-4, atol=1e-4)

  out = api.lowbit_weighted_values(f32(probs), pack(values), f32(v_scale), f32(v_zero), bits=bits,
                                   implementation=implementation)
  dequantised = values * np.repeat(v_scale, value_group, axis=3) + np.repeat(v_zero, value_group, axis=3)
  np.testing.assert_allclose(out, np.einsum("bkgt,bktd->bkgd", probs, dequantised), rtol=1e-4, atol=1e-5)


@needs_cpu_kernel
def test_cpu_kernels_run_inside_jit_and_refuse_other_dtypes():
  q, codes = jnp.ones((1, 1, 2, 64)), jnp.full((1, 1, 32, 8), 0b10101010, jnp.uint8)
  scale, zero = jnp.ones((1, 1, 1, 64)), jnp.zeros((1, 1, 1, 64))
  scores = jax.jit(lambda *a: api.lowbit_scores(*a, bits=1, implementation="cpu"))(q, codes, scale, zero)
  np.testing.assert_allclose(scores, jnp.full((1, 1, 2, 32), 32 / 8.0))  # every other channel is 1
  with pytest.raises(ValueError, match="float32"):
    api.lowbit_scores(q.astype(jnp.bfloat16), codes, scale, zero, bits=1, implementation="cpu")


def test_implementation_resolves_to_a_kernel_that_runs_here():
  cpu_or_reference = "cpu" if api.cpu_supported() else "xla"
  assert api.resolve_implementation(None, 96, 64) == cpu_or_reference  # a Pallas block of 96 splits g = 64
  if jax.default_backend() == "cpu":  # the test tier's backend: Pallas does not compile there
    assert api.resolve_implementation(None, 256, 32) == cpu_or_reference
    assert api.cpu_supported() == api.cpu_kernel_registered()
  assert api.resolve_implementation("pallas_interpret", 256, 32) == "pallas_interpret"  # asked for: kept
  with pytest.raises(ValueError, match="implementation must be one of"):
    api.resolve_implementation("triton", 256, 32)


@pytest.mark.parametrize("implementation", [*CPU_BUILDS, "xla", "pallas_interpret"])
@pytest.mark.parametrize("bits,dh,group,rows", [(1, 128, 64, 4), (2, 48, 16, 3)])
def test_mixed_products_match_float64_numpy(implementation, bits, dh, group, rows):
  """Scores, probabilities (masked softmax, with and without a soft-cap) and weighted values over the mixed
  cache: the held slots (some none: index T) at full precision in place of their dequantisation, then the exact
  rows."""
  rng = np.random.default_rng(bits + dh)
  b, k, t, held_count, exact_count = 2, 2, 2 * group, 5, 7
  codes, scale, zero = _random_lowbit(rng, b, k, t, dh, bits, group)
  values = rng.integers(0, 1 << bits, size=(b, k, t, dh))
  v_scale, v_zero = rng.uniform(0.1, 1.0, size=(b, k, t, 1)), rng.normal(size=(b, k, t, 1))
  held = np.stack([rng.permutation(t + 3)[:held_count] for _ in range(b * k)]).reshape(b, k, -1)
  held = np.where(held >= t, t, held)  # a few none
  held_keys, held_values, exact_keys, exact_values = (
      rng.normal(size=(b, k, n, dh)) for n in (held_count, held_count, exact_count, exact_count))
  q = rng.normal(size=(b, k, rows, dh))
  probs = rng.dirichlet(np.ones(t + exact_count), size=(b, k, rows))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  pack = lambda c: reference.pack_bits(jnp.asarray(c), bits)

  keys = codes * np.repeat(scale, group, axis=2) + np.repeat(zero, group, axis=2)
  vals = values * v_scale + v_zero
  for row, head in np.ndindex(b, k):
    for e, slot in enumerate(held[row, head]):
      if slot < t:
        keys[row, head, slot], vals[row, head, slot] = held_keys[row, head, e], held_values[row, head, e]
  keys, vals = np.concatenate([keys, exact_keys], axis=2), np.concatenate([vals, exact_values], axis=2)

  scores = api.mixed_scores(f32(q), pack(codes), f32(scale), f32(zero), jnp.asarray(held, jnp.int32), f32(held_keys),
                            f32(exact_keys), bits=bits, implementation=implementation)
  exact_scores = np.einsum("bkgd,bktd->bkgt", q, keys) / np.sqrt(dh)
  np.testing.assert_allclose(scores, exact_scores, rtol=1e-4, atol=1e-4)

  visible = rng.random((b, rows, t + exact_count)) < 0.7
  visible[1, 0] = False  # a row that sees nothing: uniform, as a softmax over equal masked scores
  for cap in (None, 3.0):
    capped = exact_scores if cap is None else cap * np.tanh(exact_scores / cap)
    masked = np.where(visible[:, None], capped, -np.inf)
    top = np.max(masked, axis=-1, keepdims=True)
    weights = np.where(visible[:, None], np.exp(masked - np.where(np.isfinite(top), top, 0)), 0)
    want = np.where(visible[:, None].any(-1, keepdims=True), weights / np.maximum(weights.sum(-1, keepdims=True),
                                                                                  1e-300), 1 / (t + exact_count))
    got = api.mixed_probabilities(f32(q), pack(codes), f32(scale), f32(zero), jnp.asarray(held, jnp.int32),
                                  f32(held_keys), f32(exact_keys), jnp.asarray(visible), bits=bits, logit_softcap=cap,
                                  implementation=implementation)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  out = api.mixed_weighted_values(f32(probs), pack(values), f32(v_scale), f32(v_zero), jnp.asarray(held, jnp.int32),
                                  f32(held_values), f32(exact_values), bits=bits, implementation=implementation)
  np.testing.assert_allclose(out, np.einsum("bkgt,bktd->bkgd", probs, vals), rtol=1e-4, atol=1e-5)
