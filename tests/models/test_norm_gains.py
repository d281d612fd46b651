"""norm_gain_stats against a float64 NumPy reduction of each layer's gain vector."""

import jax
import numpy as np
import pytest

from pangu import models
from pangu.models.norm_gains import LAYER_NORMS, norm_gain_stats


def _config(norm_placement):
  return models.TransformerConfig(vocab_size=64, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=32,
                                  norm_placement=norm_placement, init="tiny")


def test_stats_match_numpy_per_layer():
  params = models.init_params(_config("depth_scaled_sandwich"), jax.random.key(0))
  rng = np.random.default_rng(0)
  for name in LAYER_NORMS:
    params["layers"][name]["scale"] = rng.normal(size=(3, 16)).astype(np.float32)
  stats = norm_gain_stats(params)
  assert set(stats) == set(LAYER_NORMS)
  for name in LAYER_NORMS:
    scale = np.asarray(params["layers"][name]["scale"], np.float64)
    np.testing.assert_allclose(stats[name]["mean"], [row.mean() for row in scale], rtol=1e-12)
    np.testing.assert_allclose(stats[name]["std"], [np.sqrt(((row - row.mean()) ** 2).mean()) for row in scale],
                               rtol=1e-12)


def test_depth_scaled_post_gains_start_at_their_constant():
  """At init the post gains are c / sqrt(L) in every channel: mean c / sqrt(L), std 0."""
  stats = norm_gain_stats(models.init_params(_config("depth_scaled_sandwich"), jax.random.key(0)))
  np.testing.assert_allclose(stats["post_attn_norm"]["mean"], [0.283 / np.sqrt(3)] * 3, rtol=1e-5)
  np.testing.assert_allclose(stats["post_mlp_norm"]["mean"], [0.432 / np.sqrt(3)] * 3, rtol=1e-5)
  np.testing.assert_allclose(stats["post_mlp_norm"]["std"], 0.0, atol=1e-7)


def test_pre_ln_has_only_the_pre_norms():
  assert set(norm_gain_stats(models.init_params(_config("pre"), jax.random.key(0)))) == {"pre_attn_norm",
                                                                                          "pre_mlp_norm"}


def test_params_without_stacked_layers_are_refused():
  with pytest.raises(ValueError, match="no stacked 'layers'"):
    norm_gain_stats({"embedding": np.zeros((4, 4))})
