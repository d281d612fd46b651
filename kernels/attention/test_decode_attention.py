"""The split-K decode kernel (interpreted on CPU) against the plain-XLA reference, over a ragged KV cache.

Tolerances as in test_flash_attention.py: float32 1e-5, bfloat16 2e-2.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import pangu_kernels

B, H, K, DH, T = 3, 4, 2, 16, 37


def _cache(lengths, starts, dtype=jnp.float32, t=T, seed=0):
  """k, v [B, K, T, Dh] and slot positions [B, T]: row b holds tokens 0.. in slots starts[b]:lengths[b] (left
  padding before, empty slots after, both at position -1)."""
  rng = np.random.default_rng(seed)
  k, v = (jnp.asarray(rng.normal(size=(len(lengths), K, t, DH)), dtype) for _ in "kv")
  positions = np.full((len(lengths), t), -1, np.int32)
  for row, (start, length) in enumerate(zip(starts, lengths)):
    positions[row, start:length] = np.arange(length - start)
  return k, v, positions


def _queries(positions, lengths, new_tokens, dtype=jnp.float32, seed=1):
  """q [B, S, H, Dh] for the last `new_tokens` written slots of each row, at those slots' positions."""
  q = jnp.asarray(np.random.default_rng(seed).normal(size=(len(lengths), new_tokens, H, DH)), dtype)
  return q, np.stack([row[n - new_tokens:n] for row, n in zip(positions, lengths)])


def _assert_matches_reference(q, k, v, tolerance, **kwargs):
  got = pangu_kernels.decode_attention(q, k, v, implementation="pallas_interpret", **kwargs)
  want = pangu_kernels.decode_attention(q, k, v, implementation="xla", **kwargs)
  assert got.shape == q.shape and got.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tolerance, rtol=tolerance)


# (new tokens per row, num_splits, block_k, mask kwargs): T = 37 in blocks of 8 is 5 blocks, the last partial.
CASES = [
    (1, 1, 8, {}),
    (1, 3, 8, dict(window=6)),
    (3, 8, 8, dict(logit_softcap=2.0)),  # more splits asked than blocks: one per block
    (2, None, 16, dict(causal=False)),
]


@pytest.mark.parametrize("new_tokens,num_splits,block_k,mask_kwargs", CASES)
def test_ragged_cache_with_left_padding_and_splits(new_tokens, num_splits, block_k, mask_kwargs):
  lengths, starts = np.array([37, 20, 6]), np.array([0, 3, 1])
  k, v, positions = _cache(lengths, starts)
  q, q_positions = _queries(positions, lengths, new_tokens)
  _assert_matches_reference(q, k, v, 1e-5, q_positions=jnp.asarray(q_positions), kv_positions=jnp.asarray(positions),
                            kv_lengths=jnp.asarray(lengths), num_splits=num_splits, block_k=block_k, **mask_kwargs)


def test_a_query_that_sees_nothing_gets_the_mean_of_the_values_and_a_short_cache_is_padded():
  lengths = np.array([5, 3, 0])  # row 2 is empty: its query sees no key
  k, v, positions = _cache(lengths, np.zeros(3, int), t=5)  # T = 5, shorter than one 16-slot block
  q = _queries(positions, np.array([5, 3, 1]), 1)[0]
  _assert_matches_reference(q, k, v, 1e-5, q_positions=jnp.array([[4], [2], [0]], jnp.int32),
                            kv_positions=jnp.asarray(positions), kv_lengths=jnp.asarray(lengths))
  got = pangu_kernels.decode_attention(q, k, v, kv_lengths=jnp.asarray(lengths), implementation="pallas_interpret")
  np.testing.assert_allclose(got[2], np.broadcast_to(np.repeat(np.mean(v[2], axis=1), H // K, 0), (1, H, DH)),
                             atol=1e-6)


def test_bfloat16_cache():
  lengths = np.array([37, 29, 30])
  k, v, positions = _cache(lengths, np.zeros(3, int), jnp.bfloat16)
  q, q_positions = _queries(positions, lengths, 1, jnp.bfloat16)
  _assert_matches_reference(q, k, v, 2e-2, q_positions=jnp.asarray(q_positions), kv_positions=jnp.asarray(positions),
                            kv_lengths=jnp.asarray(lengths), num_splits=2, block_k=8)


def test_validation():
  k, v, _ = _cache(np.array([3, 3, 3]), np.zeros(3, int))
  q = jnp.zeros((3, 1, H, DH))
  with pytest.raises(ValueError, match="block_k and num_splits must be positive"):
    pangu_kernels.decode_attention(q, k, v, num_splits=0)
  with pytest.raises(ValueError, match=r"kv_positions has shape \(3, 5\), expected \(3, 37\)"):
    pangu_kernels.decode_attention(q, k, v, kv_positions=jnp.zeros((3, 5), jnp.int32))
