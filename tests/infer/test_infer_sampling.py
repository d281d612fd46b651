"""Sampling filters against a NumPy transcription of Hugging Face's TopK / TopP logits warpers."""

import jax
import numpy as np
import pytest

from pangu.infer import SamplingConfig, filter_logits, sample


def _reference_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """HF: divide by temperature; drop below the k-th largest; sort ascending and drop the tokens whose
  cumulative probability is <= 1 - top_p (always keeping the most likely one)."""
  x = logits / temperature
  if top_k:
    kth = np.sort(x, axis=-1)[:, -top_k][:, None]
    x = np.where(x < kth, -np.inf, x)
  if top_p < 1:
    order = np.argsort(x, axis=-1)
    ascending = np.take_along_axis(x, order, axis=-1)
    probs = np.exp(ascending - ascending.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    remove = np.cumsum(probs, axis=-1) <= 1 - top_p
    remove[:, -1] = False
    x = x.copy()
    np.put_along_axis(x, order, np.where(remove, -np.inf, ascending), axis=-1)
  return x


LOGITS = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (1.0, 10, 0.5), (2.0, 1, 1.0), (1.0, 0, 0.01), (0.5, 50, 0.95),
])
def test_filter_matches_hf_reference(temperature, top_k, top_p):
  got = np.asarray(filter_logits(LOGITS, SamplingConfig(temperature, top_k, top_p)))
  want = _reference_filter(LOGITS.astype(np.float64), temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  kept = ~np.isinf(want)
  np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6)


def test_greedy_is_argmax():
  np.testing.assert_array_equal(sample(LOGITS, jax.random.key(0), SamplingConfig()), LOGITS.argmax(-1))


def test_sample_frequencies_follow_the_filtered_distribution():
  config = SamplingConfig(temperature=0.8, top_k=6, top_p=0.9)
  logits = np.repeat(LOGITS[:1], 20_000, axis=0)
  draws = np.asarray(sample(logits, jax.random.key(1), config))
  want = _reference_filter(LOGITS[:1].astype(np.float64), 0.8, 6, 0.9)[0]
  probs = np.exp(want - want.max())
  probs /= probs.sum()
  freq = np.bincount(draws, minlength=LOGITS.shape[1]) / len(draws)
  assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))
  np.testing.assert_allclose(freq, probs, atol=0.015)  # ~4 sigma of a 20k-draw frequency


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_config_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    SamplingConfig(**kwargs)
