"""RoPE frequency scaling (Llama 3.1, linear, YaRN) against closed-form references, and its config field."""

import json
import math

import numpy as np
import pytest

from pangu import models
from pangu.models import RopeScaling, TransformerConfig
from pangu.nn.rope import apply_rope, rope_attention_factor, rope_frequencies


def _llama31_reference(head_dim, theta, factor, low, high, context):
  """Meta's `apply_scaling` (llama-models, Llama 3.1), one frequency at a time."""
  out = []
  for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
    wavelength = 2 * math.pi / freq
    if wavelength < context / high:
      out.append(freq)
    elif wavelength > context / low:
      out.append(freq / factor)
    else:
      smooth = (context / wavelength - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


def test_llama3_scaling_matches_meta_reference_in_every_band():
  # Llama 3.1 8B's settings: the 64 frequencies fall in all three bands.
  got = np.asarray(rope_frequencies(128, 500_000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)))
  want = _llama31_reference(128, 500_000.0, 8.0, 1.0, 4.0, 8192)
  base = _llama31_reference(128, 500_000.0, 1.0, 1.0, 4.0, 8192)
  assert (want == base).any() and (want == base / 8).any() and ((want != base) & (want != base / 8)).any()
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_linear_scaling_divides_every_frequency():
  np.testing.assert_allclose(rope_frequencies(64, 1e4, RopeScaling("linear", 4.0)),
                             np.asarray(rope_frequencies(64, 1e4)) / 4, rtol=1e-7)


def _yarn_reference(head_dim, theta, factor, context, beta_fast, beta_slow, truncate):
  """YaRN's inv_freq as Hugging Face's `_compute_yarn_parameters` defines it, in float64, dimension by dimension."""
  def correction_dim(rotations):
    return head_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))
  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  out = []
  for i in range(head_dim // 2):
    freq = theta ** (-2 * i / head_dim)
    ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: extrapolate (keep), 1: interpolate (/ factor)
    out.append(freq / factor * ramp + freq * (1 - ramp))
  return np.array(out)


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_scaling_matches_the_closed_form_in_every_band(truncate):
  # Qwen3's long-context setting: theta 1e6, 4x over 32k; the 64 frequencies span keep, ramp and divide.
  scaling = RopeScaling("yarn", 4.0, original_max_position_embeddings=32768, truncate=truncate)
  got = np.asarray(rope_frequencies(128, 1e6, scaling))
  want = _yarn_reference(128, 1e6, 4.0, 32768, 32.0, 1.0, truncate)
  base = _yarn_reference(128, 1e6, 1.0, 32768, 32.0, 1.0, truncate)
  assert np.isclose(want, base).any() and np.isclose(want, base / 4).any()
  assert (~np.isclose(want, base) & ~np.isclose(want, base / 4)).any()
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_yarn_scales_cos_and_sin_by_the_attention_factor():
  assert rope_attention_factor(RopeScaling("yarn", 4.0)) == pytest.approx(0.1 * math.log(4.0) + 1)
  assert rope_attention_factor(RopeScaling("yarn", 4.0, attention_factor=1.5)) == 1.5
  assert rope_attention_factor(RopeScaling("linear", 4.0)) == 1.0
  x = np.random.default_rng(0).normal(size=(1, 3, 2, 8)).astype(np.float32)
  positions = np.arange(3, dtype=np.int32)[None]
  inv_freq = rope_frequencies(8, 1e4)
  scaled = apply_rope(x, positions, inv_freq, 1.5)
  np.testing.assert_allclose(scaled, 1.5 * np.asarray(apply_rope(x, positions, inv_freq)), rtol=1e-6, atol=1e-6)


def test_rope_scaling_survives_a_json_round_trip():
  config = models.tiny(rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
  assert TransformerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("kwargs, field", [
    (dict(kind="ntk", factor=2.0), "kind"),
    (dict(kind="yarn", factor=2.0, beta_fast=0.0), "beta_fast"),
    (dict(kind="yarn", factor=2.0, attention_factor=-1.0), "attention_factor"),
    (dict(kind="linear", factor=0.0), "factor"),
    (dict(kind="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0), "high_freq_factor"),
    (dict(kind="llama3", factor=8.0, original_max_position_embeddings=0), "original_max_position_embeddings"),
])
def test_bad_rope_scaling_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    RopeScaling(**kwargs)


def test_config_rejects_a_dict_for_rope_scaling():
  with pytest.raises(ValueError, match="rope_scaling"):
    models.tiny(rope_scaling={"kind": "linear", "factor": 2.0})
