"""RoPE frequency scaling (Llama 3.1, linear) against Meta's reference loop, and its config field."""

import json
import math

import numpy as np
import pytest

from pangu import models
from pangu.models import RopeScaling, TransformerConfig
from pangu.nn.rope import rope_frequencies


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


def test_rope_scaling_survives_a_json_round_trip():
  config = models.tiny(rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
  assert TransformerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("kwargs, field", [
    (dict(kind="yarn", factor=2.0), "kind"),
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
