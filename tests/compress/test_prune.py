"""prune(): the identity at ratio 0; a really smaller model whose shapes, config and parameter count agree; output
recovery that lowers the pruned layer's error on the calibration data; save / reload through safetensors; and
clear errors for requests that cannot be met."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import models
from pangu.compress.prune import METHODS, prune
from pangu.interop import hf
from pangu.nn.attention import Attention, AttentionMask
from pangu.nn.mlp import MLP, MLPConfig
from pangu.nn.norms import rms_norm

CONFIG = models.tiny(max_position_embeddings=64)
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 32)).astype(np.int32)
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "interop", "fixtures")


@pytest.fixture(scope="module")
def params():
  return models.init_params(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def slim(params):
  return prune(CONFIG, params, TOKENS, method="slimllm", ratio=0.4, batch_size=4)


def _check_model(config, params, report, tokens=TOKENS):
  """Shapes, config, report and parameter count agree, and the model runs."""
  abstract = nn.unbox(models.abstract_params(config))
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  assert jax.tree.all(jax.tree.map(lambda a, p: a.shape == p.shape and a.dtype == p.dtype, abstract, params))
  assert sum(x.size for x in jax.tree.leaves(params)) == models.param_count(config) == report.params_after
  assert len(report.layers) == config.n_layers
  for i, layer in enumerate(report.layers):
    shape = config.layer(i)
    assert (len(layer.kept_heads), len(layer.kept_kv_heads), len(layer.kept_channels)) == (
        shape.n_heads, shape.n_kv_heads, shape.d_ff)
  logits = models.forward(config, params, tokens[:2])
  assert logits.shape == (2, tokens.shape[1], config.vocab_size) and bool(jnp.isfinite(logits).all())
  return logits


def test_ratio_zero_is_the_identity(params):
  config, pruned, report = prune(CONFIG, params, TOKENS, method="slimllm", ratio=0.0, batch_size=4)
  assert config == CONFIG and report.achieved_ratio == 0
  np.testing.assert_array_equal(models.forward(config, pruned, TOKENS[:2]), models.forward(CONFIG, params, TOKENS[:2]))


def test_pruned_model_is_smaller_and_consistent(slim):
  config, params, report = slim
  _check_model(config, params, report)
  assert not config.is_uniform and not config.scanned  # per-layer ratios: per-layer shapes, unrolled
  assert config.attention_output_bias and config.mlp_bias  # the recovery's biases
  assert report.params_after < report.params_before
  assert abs(report.achieved_ratio - 0.4) < 0.1  # a KV group here is ~6 % of the non-embedding parameters
  assert report.calibration_tokens == TOKENS.size and report.seconds > 0
  assert report.to_dict()["options"]["method"] == "slimllm"


def test_non_uniform_result_saves_and_reloads(slim, tmp_path):
  config, params, _ = slim
  hf.save_pretrained(config, params, tmp_path)
  loaded_config, loaded = hf.load_pretrained(tmp_path, scan_layers=config.scan_layers)
  assert loaded_config == config
  np.testing.assert_array_equal(models.forward(loaded_config, loaded, TOKENS[:2]),
                                models.forward(config, params, TOKENS[:2]))


def _layer0_attention(config, params):
  """Layer 0's attention output (before the residual add) on the calibration tokens."""
  layer = models.layer_params(config, params, 0)
  x = jnp.take(params["embedding"], TOKENS, axis=0)
  u = rms_norm(x, layer["pre_attn_norm"]["scale"], config.norm_eps)
  mask = AttentionMask.self_attention(jnp.broadcast_to(jnp.arange(TOKENS.shape[1]), TOKENS.shape))
  return x, Attention(config.attention_config(0)).apply({"params": layer["attn"]}, u, mask)[0]


def _error(a, b):
  return float(jnp.sum(jnp.square(a - b)))


def test_recovery_lowers_the_layer_output_error(params):
  x, want = _layer0_attention(CONFIG, params)
  runs = {recovery: prune(CONFIG, params, TOKENS, method="slimllm", ratio=0.4, uniform=True, recovery=recovery,
                          ridge=0.0, batch_size=4) for recovery in ("none", "channel_affine", "lstsq")}
  assert len({run[2].layers[0].kept_heads for run in runs.values()}) == 1  # the recovery does not change the choice
  errors = {name: _error(_layer0_attention(c, p)[1], want) for name, (c, p, _) in runs.items()}
  assert errors["channel_affine"] < 0.9 * errors["none"]
  assert errors["lstsq"] <= errors["channel_affine"] * (1 + 1e-4)

  # FFN: on the residual the affine run's layer 0 produces, its recovered `down` against the same kept channels
  # with `down` merely sliced.
  config, pruned, report = runs["channel_affine"]
  layer, original = models.layer_params(config, pruned, 0), models.layer_params(CONFIG, params, 0)
  u = rms_norm(x + _layer0_attention(config, pruned)[1], layer["pre_mlp_norm"]["scale"], config.norm_eps)
  want = MLP(CONFIG.mlp_config(0)).apply({"params": original["mlp"]}, u)
  kept = np.asarray(report.layers[0].kept_channels)
  sliced = {"gate": original["mlp"]["gate"][:, kept], "up": original["mlp"]["up"][:, kept],
            "down": original["mlp"]["down"][kept]}
  unrecovered = MLP(MLPConfig(CONFIG.d_model, len(kept))).apply({"params": sliced}, u)
  recovered = MLP(config.mlp_config(0)).apply({"params": layer["mlp"]}, u)
  assert _error(recovered, want) < _error(unrecovered, want)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="slimllm", ratio=1.0), r"ratio .* must be in \[0, 1\), got 1.0"),
    (dict(method="slimllm", ratio=-0.1), r"must be in \[0, 1\), got -0.1"),
    (dict(method="obd", ratio=0.2), r"method must be one of .*got 'obd'"),
    (dict(method="magnitude", ratio=0.2, greedy_search=False),
     r"method 'magnitude' takes no option \['greedy_search'\]"),
    (dict(method="slimllm", ratio=0.2, gqa="heads_per_group", config=models.tiny(n_kv_heads=4)),
     r"gqa='heads_per_group' cannot remove heads from layer 0: each of its 4 KV groups has one query head"),
    (dict(method="slimllm", ratio=0.2, config=models.tiny(n_kv_heads=1)),
     r"gqa='groups' cannot remove heads from layer 0: its 4 query heads share one KV head"),
    (dict(method="slimllm", ratio=0.95), r"ratio=0.95 is out of reach"),
    (dict(method="layer_drop", ratio=0.2, uniform=True), "uniform=True does not apply to method 'layer_drop'"),
    (dict(method="slimllm", ratio=0.2, tokens=TOKENS[0]), r"calibration_tokens must be int \[N, S\]"),
    (dict(method="slimllm", ratio=0.2, tokens=TOKENS + CONFIG.vocab_size), r"must lie in \[0, vocab_size=384\)"),
    (dict(method="slimllm", ratio=0.2, recovery="mean_shift", recovery_bias=False),
     "mean_shift.* recovery_bias=False leaves nothing"),
    (dict(method="flap", ratio=0.2, mlp_recovery_bias=False), "mean_shift.* mlp_recovery_bias=False leaves nothing"),
])
def test_invalid_requests_are_refused(kwargs, message):
  config = kwargs.pop("config", CONFIG)
  tokens = kwargs.pop("tokens", TOKENS)
  # Requests are checked before any computation: zeros in the right shapes will do.
  model_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.unbox(models.abstract_params(config)))
  with pytest.raises(ValueError, match=message):
    prune(config, model_params, tokens, batch_size=4, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Full tier: every method and layout.

SANDWICH = models.tiny(n_layers=3, norm_placement="sandwich", n_kv_heads=4)


@pytest.mark.slow
@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_a_sandwich_norm_model(method, uniform):
  if method == "layer_drop" and uniform:
    pytest.skip("layer_drop has no uniform variant")
  params = models.init_params(SANDWICH, jax.random.key(1))
  config, pruned, report = prune(SANDWICH, params, TOKENS, method=method, ratio=0.5, uniform=uniform, batch_size=4)
  _check_model(config, pruned, report)
  step = 1 / SANDWICH.n_layers if method == "layer_drop" else 0.12  # the granularity: a layer, a head of four
  assert abs(report.achieved_ratio - 0.5) <= step / 2 + 1e-6
  if method == "layer_drop":
    assert config.n_layers < SANDWICH.n_layers and report.dropped_layers
  elif uniform:
    assert config.is_uniform and config.scanned


@pytest.mark.slow
def test_heads_per_group_keeps_every_kv_head_and_equal_groups(params):
  config, pruned, report = prune(CONFIG, params, TOKENS, method="wanda_sp", ratio=0.3, gqa="heads_per_group",
                                 batch_size=4)
  _check_model(config, pruned, report)
  for i in range(config.n_layers):
    assert config.layer(i).n_kv_heads == CONFIG.n_kv_heads
  assert any(config.layer(i).n_heads < CONFIG.n_heads for i in range(config.n_layers))


@pytest.mark.slow
def test_decode_layout_comes_back_in_decode_layout(params):
  from pangu.models.param_layout import convert_param_layout
  decode_config, decode_params = convert_param_layout(CONFIG, params, "decode")
  config, pruned, report = prune(decode_config, decode_params, TOKENS, method="flap", ratio=0.3, batch_size=4)
  assert config.param_layout == "decode"
  training_config, training = prune(CONFIG, params, TOKENS, method="flap", ratio=0.3, batch_size=4)[:2]
  np.testing.assert_allclose(models.forward(config, pruned, TOKENS[:2]),
                             models.forward(training_config, training, TOKENS[:2]), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_hugging_face_models_prune_save_and_reload(family, tmp_path):
  config, params = hf.load_pretrained(os.path.join(FIXTURES, family))
  tokens = TOKENS % config.vocab_size
  # Qwen3 checkpoints have no MLP biases (pangu.interop.hf): o_proj takes its intercept, down_proj is refit only.
  options = dict(mlp_recovery_bias=False) if family == "qwen3" else {}
  pruned_config, pruned, report = prune(config, params, tokens, method="slimllm", ratio=0.3, batch_size=4, **options)
  _check_model(pruned_config, pruned, report, tokens)
  hf.save_pretrained(pruned_config, pruned, tmp_path)
  loaded_config, loaded = hf.load_pretrained(tmp_path, scan_layers=pruned_config.scan_layers)
  np.testing.assert_array_equal(models.forward(loaded_config, loaded, tokens[:2]),
                                models.forward(pruned_config, pruned, tokens[:2]))
