"""Depth growth keeps the function: the grown model's logits equal the shallow model's."""

import jax
import numpy as np
import pytest

from pangu import models
from pangu.models.growth import grow_depth

CONFIG = models.TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                                  max_position_embeddings=64)


def test_grown_model_computes_the_shallow_models_function():
  params = models.init_params(CONFIG, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, 64, (2, 24)).astype(np.int32)
  grown_config, grown = grow_depth(CONFIG, params, 6, (1, 5), jax.random.key(1))
  assert grown_config.n_layers == 6 and grown["layers"]["attn"]["q"].shape[0] == 6
  np.testing.assert_allclose(models.forward(grown_config, grown, tokens), models.forward(CONFIG, params, tokens),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(grown["layers"]["mlp"]["up"][5], params["layers"]["mlp"]["up"][1])
  assert np.all(grown["layers"]["attn"]["o"][[0, 2, 3, 4]] == 0) and np.any(grown["layers"]["attn"]["q"][0] != 0)


def test_growth_refuses_bad_depths():
  params = models.init_params(CONFIG, jax.random.key(0))
  with pytest.raises(ValueError, match="at="):
    grow_depth(CONFIG, params, 4, (3, 1), jax.random.key(1))
  with pytest.raises(ValueError, match="at="):
    grow_depth(CONFIG, params, 4, (1, 4), jax.random.key(1))
