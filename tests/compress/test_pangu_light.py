"""Pangu Light: the identity when nothing is removed; post-norm absorption exact for a constant RMS (float64
reference); CLAP's merged layer and SLNP's gains against the spec's formulas written out in NumPy; a pruned model
that saves to Hugging Face and reloads with identical logits; clear errors for impossible targets."""

import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from pangu import models
from pangu.compress.prune import LightOptions, LightTarget, pangu_light_prune
from pangu.compress.prune import light_reinit
from pangu.compress.prune.light_stats import LightStats
from pangu.compress.prune.pangu_light import _depth_plan
from pangu.interop import hf

FIXTURES = pathlib.Path(__file__).parents[1] / "interop" / "fixtures"
TOKENS = np.random.default_rng(0).integers(0, 384, (8, 32)).astype(np.int32)
SANDWICH = models.tiny(n_layers=4, norm_placement="depth_scaled_sandwich", max_position_embeddings=64)
PRE_NORM = models.tiny(n_layers=4, tie_embeddings=True, max_position_embeddings=64)
SMALLER = LightTarget(n_layers=3, d_model=48, n_heads=2, d_ff=96)


@pytest.fixture(scope="module")
def sandwich_params():
  params = models.init_params(SANDWICH, jax.random.key(0))
  # Gains away from their init, so that every fold and ratio below has something to do.
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * (0.5 + rng.random(x.shape)).astype(x.dtype) if "norm" in jax.tree_util.keystr(path)
      else x, params)


def _check_model(config, params):
  abstract = nn.unbox(models.abstract_params(config))
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  assert jax.tree.all(jax.tree.map(lambda a, p: a.shape == p.shape, abstract, params))


def test_nothing_removed_is_the_identity(sandwich_params):
  full = LightTarget(SANDWICH.n_layers, SANDWICH.d_model, SANDWICH.n_heads, SANDWICH.d_ff)
  config, params, report = pangu_light_prune(SANDWICH, sandwich_params, TOKENS, target=full,
                                             options=LightOptions(absorb="none"))
  assert config == SANDWICH.replace(head_dim=SANDWICH.head_dim)
  assert report.kept_layers == (0, 1, 2, 3) and report.achieved_ratio == 0
  np.testing.assert_array_equal(models.forward(config, params, TOKENS),
                                models.forward(SANDWICH, sandwich_params, TOKENS))


def test_absorbed_and_pruned_sandwich_model_saves_and_reloads(sandwich_params, tmp_path):
  config, params, report = pangu_light_prune(SANDWICH, sandwich_params, TOKENS, target=SMALLER)
  assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads, config.d_ff) == (3, 48, 2, 1, 96)
  assert config.head_dim == SANDWICH.head_dim and config.norm_placement == "pre"
  assert len(report.absorb_coefficients) == 2 * SANDWICH.n_layers and len(report.kept_channels) == 48
  assert sum(len(d) for d in report.donors.values()) == 1
  _check_model(config, params)
  hf.save_pretrained(config, params, tmp_path)
  loaded_config, loaded = hf.load_pretrained(tmp_path)
  np.testing.assert_array_equal(models.forward(loaded_config, loaded, TOKENS), models.forward(config, params, TOKENS))


def test_pruned_pre_norm_tied_model_saves_and_reloads(tmp_path):
  params = models.init_params(PRE_NORM, jax.random.key(2))
  config, pruned, report = pangu_light_prune(PRE_NORM, params, TOKENS, target=SMALLER,
                                             options=LightOptions(clap_ffn="merge", slnp="sqrt_ratio"))
  _check_model(config, pruned)
  assert models.param_count(config) == report.params_after < report.params_before
  hf.save_pretrained(config, pruned, tmp_path)
  loaded_config, loaded = hf.load_pretrained(tmp_path)
  assert loaded_config.tie_embeddings and loaded_config.d_model == 48
  np.testing.assert_array_equal(models.forward(loaded_config, loaded, TOKENS), models.forward(config, pruned, TOKENS))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_model_loaded_from_a_hugging_face_folder_prunes_saves_and_reloads(family, tmp_path):
  """Loaded models (Qwen2's q/k/v biases, Qwen3's per-head q/k norms): nothing removed is the identity, and a pruned
  model saves as a folder of its architecture that reloads with identical logits."""
  source_config, source = hf.load_pretrained(FIXTURES / family)
  tokens = TOKENS % source_config.vocab_size
  full = LightTarget(source_config.n_layers, source_config.d_model, source_config.n_heads, source_config.d_ff)
  same_config, same, _ = pangu_light_prune(source_config, source, tokens, target=full)
  np.testing.assert_allclose(models.forward(same_config, same, tokens), models.forward(source_config, source, tokens),
                             rtol=1e-5, atol=1e-5)
  target = LightTarget(n_layers=1, d_model=48, n_heads=2, d_ff=48)
  config, params, _ = pangu_light_prune(source_config, source, tokens, target=target)
  assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads, config.d_ff) == (1, 48, 2, 1, 48)
  _check_model(config, params)
  hf.save_pretrained(config, params, tmp_path)
  loaded_config, loaded = hf.load_pretrained(tmp_path)
  np.testing.assert_array_equal(models.forward(loaded_config, loaded, tokens), models.forward(config, params, tokens))


def test_absorption_is_exact_when_the_rms_is_constant():
  """Spec 3.2 pitfall: with the same RMS r for every token, c = 1 / r and the folded sub-block adds exactly
  gamma_post * z / RMS(z). Reference in float64; z = heads @ W_o with each token's heads scaled to RMS r."""
  rng = np.random.default_rng(3)
  heads, kernel, gamma, eps, r = rng.normal(size=(50, 4, 8)), rng.normal(size=(4, 8, 16)), rng.random(16) + .5, \
      1e-5, 0.7
  z = np.einsum("nhc,hcd->nd", heads, kernel)
  heads *= (np.sqrt(r ** 2 - eps) / np.sqrt(np.mean(z ** 2, axis=-1)))[:, None, None]
  z = np.einsum("nhc,hcd->nd", heads, kernel)
  reference = gamma * z / np.sqrt(np.mean(z ** 2, axis=-1, keepdims=True) + eps)
  stats = light_reinit.absorb_stats(z, gamma, eps)
  assert stats.rms_cv < 1e-6
  for method in ("const_lstsq", "const_mean"):
    folded, _ = light_reinit.fold_post_norm(kernel, None, gamma, stats.coefficient(method), method)
    np.testing.assert_allclose(np.einsum("nhc,hcd->nd", heads, folded), reference, rtol=1e-10)


def test_absorption_coefficient_is_the_least_squares_fit():
  rng = np.random.default_rng(4)
  z, gamma = rng.normal(size=(40, 6)) * rng.random((40, 1)) * 3, rng.random(6) + .5
  r = np.sqrt(np.mean(z ** 2, axis=-1) + 1e-5)
  target = gamma * z / r[:, None]
  best = np.sum(target * gamma * z) / np.sum((gamma * z) ** 2)  # argmin_c sum ||target - c gamma z||^2
  stats = light_reinit.absorb_stats(z, gamma, 1e-5)
  np.testing.assert_allclose(stats.coefficient("const_lstsq"), best, rtol=1e-12)
  np.testing.assert_allclose(stats.coefficient("const_mean"), np.mean(1 / r), rtol=1e-12)
  np.testing.assert_allclose(stats.rms_cv, np.std(r) / np.mean(r), rtol=1e-6)


def test_clap_merged_attention_matches_the_formula():
  """Recipient + two donors, 3 KV groups of 2 query heads each, keep the 3 best of the 9 pooled groups."""
  rng = np.random.default_rng(5)
  d, k, group, dh = 8, 3, 2, 4
  def attention():
    return {"q": rng.normal(size=(d, k * group, dh)), "k": rng.normal(size=(d, k, dh)),
            "v": rng.normal(size=(d, k, dh)), "o": rng.normal(size=(k * group, dh, d)),
            "q_norm": rng.normal(size=dh)}
  sources = [attention() for _ in range(3)]
  pre = [rng.random(d) + .2 for _ in range(3)]
  post = [rng.random(d) + .2 for _ in range(3)]
  importances = [rng.random(k) for _ in range(3)]
  chosen = light_reinit.pooled_units(importances, 3, "raw")
  flat = np.concatenate(importances)
  expected_chosen = sorted(divmod(int(i), k) for i in np.argsort(-flat)[:3])
  assert chosen == expected_chosen
  merged = light_reinit.merge_attention(sources, pre, post, chosen, group)
  for slot, (s, g) in enumerate(chosen):
    for h in range(group):
      for row in range(d):
        np.testing.assert_allclose(merged["q"][row, slot * group + h],
                                   sources[s]["q"][row, g * group + h] * pre[s][row] / pre[0][row])
      for col in range(d):
        np.testing.assert_allclose(merged["o"][slot * group + h, :, col],
                                   sources[s]["o"][g * group + h, :, col] * post[s][col] / post[0][col])
    for name in ("k", "v"):
      np.testing.assert_allclose(merged[name][:, slot], sources[s][name][:, g] * (pre[s] / pre[0])[:, None])
  np.testing.assert_array_equal(merged["q_norm"], sources[0]["q_norm"])


def test_clap_per_layer_normalisation_and_chains_of_removed_layers():
  importances = [np.array([4.0, 2.0]), np.array([0.3, 0.1])]
  assert light_reinit.pooled_units(importances, 2, "raw") == [(0, 0), (0, 1)]
  assert light_reinit.pooled_units(importances, 2, "per_layer_sum") == [(0, 0), (1, 0)]
  # Layers 2 and 3 have the lowest Block Influence: both go, both to layer 1; layer 0 always stays.
  stats = LightStats(np.ones(4), np.ones((5, 2)), np.ones((5, 2)), np.array([0.0, .5, .1, .2, .9]), {})
  assert _depth_plan(stats, 5, 3) == ([0, 1, 4], {0: [], 1: [2, 3], 4: []})


def test_slnp_gains_follow_the_formulas():
  rng = np.random.default_rng(6)
  gamma, kept = rng.random(10) + .1, np.array([0, 3, 4, 8])
  np.testing.assert_allclose(light_reinit.slnp_gain(gamma, kept, "l2"),
                             gamma[kept] * np.sqrt(np.sum(gamma ** 2) / np.sum(gamma[kept] ** 2)), rtol=1e-12)
  np.testing.assert_allclose(light_reinit.slnp_gain(gamma, kept, "sqrt_ratio"), gamma[kept] * np.sqrt(10 / 4),
                             rtol=1e-12)
  np.testing.assert_array_equal(light_reinit.slnp_gain(gamma, kept, "none"), gamma[kept])
  zero = np.array([0.0, 0.0, 1.0])
  np.testing.assert_array_equal(light_reinit.slnp_gain(zero, np.array([0, 1]), "l2"), [0.0, 0.0])
  np.testing.assert_allclose(np.linalg.norm(light_reinit.slnp_gain(gamma, kept, "l2")), np.linalg.norm(gamma))


@pytest.mark.parametrize("target, match", [
    (dict(n_layers=0, d_model=64, n_heads=4, d_ff=128), "n_layers"),
    (dict(n_layers=2, d_model=64, n_heads=3, d_ff=128), "split a GQA group"),
    (dict(n_layers=2, d_model=96, n_heads=4, d_ff=128), "d_model=96 exceeds"),
    (dict(n_layers=5, d_model=64, n_heads=4, d_ff=128), "n_layers=5 exceeds"),
])
def test_impossible_targets_are_refused(target, match):
  with pytest.raises(ValueError, match=match):
    pangu_light_prune(PRE_NORM, {}, TOKENS, target=LightTarget(**target))


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match="slnp"):
    LightOptions(slnp="l1")
  with pytest.raises(ValueError, match="absorb"):
    LightOptions(absorb="exact")


def test_random_importance_is_seeded_and_ignores_the_activations(sandwich_params):
  """The random lower bound: the target shape, the same selection for the same seed, and a selection that does not
  follow the activation importances (another seed picks other channels)."""
  prune = lambda **o: pangu_light_prune(SANDWICH, sandwich_params, TOKENS, target=SMALLER,
                                        options=LightOptions(importance="random", **o))
  config, params, report = prune(seed=3)
  _check_model(config, params)
  assert (config.n_layers, config.d_model, config.n_heads, config.d_ff) == (3, 48, 2, 96)
  assert prune(seed=3)[2].kept_channels == report.kept_channels
  assert prune(seed=4)[2].kept_channels != report.kept_channels
  with pytest.raises(ValueError, match="importance"):
    LightOptions(importance="gradient")
