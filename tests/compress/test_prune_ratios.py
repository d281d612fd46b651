"""Per-layer ratios (spec 3.1) and the closed-form parameter accounting they are solved on."""

import numpy as np
import pytest

from pangu import models
from pangu.compress.prune import ratios
from pangu.compress.prune.options import PruneOptions
from pangu.models import LayerShape

SHAPES = (LayerShape(4, 2, 128), LayerShape(2, 1, 96), LayerShape(4, 4, 64))
CONFIGS = {
    "plain": models.tiny(),
    "biases_non_uniform": models.tiny(n_layers=3, layer_shapes=SHAPES, attention_bias=True,
                                      attention_output_bias=True, mlp_bias=True),
    "sandwich_qk_norm_tied": models.tiny(norm_placement="sandwich", qk_norm=True, tie_embeddings=True),
    "gelu_mlp_bias": models.tiny(mlp_activation="gelu", mlp_bias=True, head_dim=24),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_closed_form_count_equals_param_count(name):
  config = CONFIGS[name]
  embeddings = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
  assert ratios.non_embedding_params(config) == models.param_count(config) - embeddings


def test_layer_weights_are_the_official_softmax():
  sims = np.array([0.2, 0.9, 0.5, 0.7, 0.95])
  alpha, n_sel = 10.0, 3
  weights = ratios.layer_weights(sims, alpha, n_sel)
  selected = [4, 1, 3]  # the three most similar
  soft = np.exp(alpha * sims[selected]) / np.exp(alpha * sims[selected]).sum()
  np.testing.assert_allclose(weights[selected], n_sel * soft)
  assert weights[[0, 2]].tolist() == [0, 0]
  assert weights[selected].mean() == pytest.approx(1.0)


def test_default_layer_settings_scale_the_official_ones():
  assert PruneOptions("slimllm", 0.2).layer_settings(32) == (10.0, 26)
  assert PruneOptions("slimllm", 0.5).layer_settings(32) == (7.0, 30)
  assert PruneOptions("slimllm", 0.5).layer_settings(12) == (7.0, 11)
  with pytest.raises(ValueError, match="selected_layers=13 exceeds"):
    PruneOptions("slimllm", 0.5, selected_layers=13).layer_settings(12)


@pytest.mark.parametrize("gqa", ["groups", "heads_per_group"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_solved_ratios_meet_the_target_to_the_granularity(gqa, ratio):
  config = models.tiny(n_layers=6, n_heads=8, n_kv_heads=4, d_ff=256)
  options = PruneOptions("slimllm", ratio, gqa=gqa)
  weights = ratios.layer_weights(np.linspace(0.5, 0.9, 6), 7.0, 5)
  layer_ratios = ratios.solve_layer_ratios(config, weights, options)
  assert layer_ratios[0] == 0 and (layer_ratios[1:] > 0).all() and (layer_ratios <= options.max_layer_ratio).all()
  shapes = [ratios.shape_after(config.layer(i), r, options) for i, r in enumerate(layer_ratios)]
  after = ratios.non_embedding_params(ratios.pruned_config(config, shapes, options))
  achieved = 1 - after / ratios.non_embedding_params(config)
  # One KV group of one layer is the coarsest step: ~2 D Dh (G + 1) parameters.
  step = 2 * config.d_model * config.head_dim * 3 / ratios.non_embedding_params(config)
  assert abs(achieved - ratio) < step


def test_unreachable_ratio_is_refused():
  config = models.tiny(n_layers=4)
  weights = ratios.layer_weights(np.linspace(0.5, 0.9, 4), 7.0, 2)
  with pytest.raises(ValueError, match="ratio=0.9 is out of reach"):
    ratios.solve_layer_ratios(config, weights, PruneOptions("slimllm", 0.9))
