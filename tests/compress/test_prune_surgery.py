"""Removing heads / channels / layers gives the model that zeroing their output-projection rows gives, and
impossible edits are refused with the layer and the indices named."""

import jax
import numpy as np
import pytest

from pangu import models
from pangu.compress.prune import surgery

CONFIG = models.tiny(attention_bias=True, attention_output_bias=True, mlp_bias=True)
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def model():
  """The tiny model with every bias random (initialised to zero, they would slice unnoticed)."""
  params = models.init_params(CONFIG, jax.random.key(0))
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: rng.normal(size=x.shape).astype(x.dtype) * 0.1 if "bias" in jax.tree_util.keystr(path) else x,
      params)
  return surgery.unrolled(CONFIG, params)


def _zero(params, layer, sublayer, name, index, axis):
  leaf = np.array(params[f"layer_{layer}"][sublayer][name])
  leaf[(slice(None),) * axis + (index,)] = 0
  layer_params = {**params[f"layer_{layer}"], sublayer: {**params[f"layer_{layer}"][sublayer], name: leaf}}
  return {**params, f"layer_{layer}": layer_params}


def test_removal_equals_masking(model):
  config, params = model
  cut_config, cut = surgery.keep_heads(config, params, 0, [2, 3])  # KV group 1 only
  cut_config, cut = surgery.keep_heads(cut_config, cut, 1, [0, 3])  # one query head per group, both K/V heads
  cut_config, cut = surgery.keep_channels(cut_config, cut, 1, [1, 4, 5, 60, 127])
  assert cut_config.layer_shapes == (models.LayerShape(2, 1, 128), models.LayerShape(2, 2, 5))
  masked = _zero(params, 0, "attn", "o", [0, 1], 0)
  masked = _zero(masked, 1, "attn", "o", [1, 2], 0)
  masked = _zero(masked, 1, "mlp", "down", [i for i in range(128) if i not in (1, 4, 5, 60, 127)], 0)
  np.testing.assert_allclose(models.forward(cut_config, cut, TOKENS), models.forward(config, masked, TOKENS),
                             atol=1e-5)
  dropped_config, dropped = surgery.drop_layers(cut_config, cut, [0])
  assert dropped_config.n_layers == 1 and dropped["layer_0"] is cut["layer_1"]
  assert dropped_config.layer_shapes == (cut_config.layer(1),)


def test_finalise_restores_the_layout(model):
  config, params = model
  scanned = models.init_params(CONFIG, jax.random.key(0))
  back_config, back = surgery.finalise(*surgery.unrolled(CONFIG, scanned), like=CONFIG)
  assert back_config == CONFIG
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), back, scanned))


def test_impossible_edits_are_refused(model):
  config, params = model
  with pytest.raises(ValueError, match=r"layer 0 query heads: indices \[4, 9\] out of range: there are 4"):
    surgery.keep_heads(config, params, 0, [0, 4, 9])
  with pytest.raises(ValueError, match=r"layer 1: grouped-query attention needs the same number of query heads "
                                       r"in every kept KV group; the request keeps \{0: 2, 1: 1\}"):
    surgery.keep_heads(config, params, 1, [0, 1, 2])
  with pytest.raises(ValueError, match="at least one must be kept"):
    surgery.keep_channels(config, params, 0, [])
  with pytest.raises(ValueError, match="repeated"):
    surgery.keep_channels(config, params, 0, [3, 3])
  with pytest.raises(ValueError, match="layer 5 out of range"):
    surgery.keep_channels(config, params, 5, [3])
  with pytest.raises(ValueError, match="would leave no layer"):
    surgery.drop_layers(config, params, [0, 1])
  with pytest.raises(ValueError, match="unrolled training layout"):
    surgery.keep_heads(CONFIG, models.init_params(CONFIG, jax.random.key(0)), 0, [0])
