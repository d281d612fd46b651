import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import models
from pangu.models import LayerShape, TransformerConfig
from pangu.nn.attention import AttentionMask, dot_product_attention
from pangu.nn.mole import MoLEConfig

from reference_decoder import decoder_logits


def _float64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _randomise_gains(params, rng):
  """Init sets gains to constants; random gains make the reference comparison see every gain."""
  def f(path, x):
    if getattr(path[-1], "key", None) in ("scale", "q_norm", "k_norm", "q_bias", "k_bias", "v_bias"):
      return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(f, params)


CONFIGS = {
    "pre": models.tiny(),
    "dssn_tiny_init": models.tiny(norm_placement="depth_scaled_sandwich", init="tiny"),
    "sandwich_tied_qwen3": models.tiny(norm_placement="sandwich", tie_embeddings=True, qk_norm=True),
    "qwen2_bias_mha": models.tiny(attention_bias=True, n_kv_heads=4, rope_theta=1e6),
    "non_uniform": models.tiny(layer_shapes=(LayerShape(4, 2, 128), LayerShape(2, 1, 96))),
    "gelu_mole_sandwich": models.tiny(mlp_activation="gelu", mole=MoLEConfig(num_experts=3, expert_dim=40),
                                      norm_placement="sandwich"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_float64_numpy_reference(name):
  cfg = CONFIGS[name]
  params = _randomise_gains(models.init_params(cfg, jax.random.key(0)), np.random.default_rng(1))
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
  logits = models.forward(cfg, params, tokens)
  assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32
  unrolled = models.unstack_layers(params, cfg.n_layers) if cfg.scanned else params
  for b in range(2):
    want = decoder_logits(cfg, _float64(unrolled), tokens[b])
    np.testing.assert_allclose(np.asarray(logits[b]), want, atol=1e-4, rtol=1e-4)


def test_scanned_and_unrolled_give_same_logits():
  cfg = models.tiny(n_layers=3, norm_placement="depth_scaled_sandwich")
  scanned = models.init_params(cfg, jax.random.key(0))
  assert "layers" in scanned and scanned["layers"]["mlp"]["up"].shape[0] == 3
  unrolled_cfg = cfg.replace(scan_layers=False)
  unrolled = models.unstack_layers(scanned, 3)
  assert set(jax.tree.map(jnp.shape, unrolled)) == set(jax.tree.map(jnp.shape, models.init_params(unrolled_cfg, jax.random.key(0))))
  tokens = jnp.arange(20, dtype=jnp.int32).reshape(2, 10)
  np.testing.assert_allclose(models.forward(cfg, scanned, tokens), models.forward(unrolled_cfg, unrolled, tokens),
                             atol=1e-6)
  restacked = models.stack_layers(unrolled, 3)
  jax.tree.map(np.testing.assert_array_equal, restacked, scanned)


@pytest.mark.parametrize("remat", ["block", "selective"])
def test_remat_changes_memory_not_gradients(remat):
  cfg = models.tiny()
  params = models.init_params(cfg, jax.random.key(0))
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)

  def loss(c, p):
    return models.cross_entropy_loss(models.forward(c, p, tokens[:, :-1]), tokens[:, 1:])[0]

  want = jax.grad(lambda p: loss(cfg, p))(params)
  got = jax.grad(lambda p: loss(cfg.replace(remat=remat), p))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)


def test_causal_future_tokens_do_not_change_past_logits():
  cfg = models.tiny()
  params = models.init_params(cfg, jax.random.key(0))
  a = jnp.array([[1, 2, 3, 4, 5, 6]], jnp.int32)
  b = a.at[0, 4:].set(jnp.array([100, 200]))
  la, lb = models.forward(cfg, params, a), models.forward(cfg, params, b)
  np.testing.assert_allclose(la[:, :4], lb[:, :4], atol=1e-6)
  assert not np.allclose(la[:, 4:], lb[:, 4:])


def test_gqa_attention_equals_repeated_kv_heads():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 5, 6, 8)).astype(np.float32)
  k = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
  v = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
  pos = np.broadcast_to(np.arange(5), (2, 5))
  mask = AttentionMask.self_attention(jnp.asarray(pos))
  got = dot_product_attention(q, k, v, mask)
  want = dot_product_attention(q, np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2), mask)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_dssn_gains_and_tiny_init_follow_the_paper():
  cfg = models.tiny(n_layers=8, d_model=128, d_ff=512, norm_placement="depth_scaled_sandwich", init="tiny")
  params = models.init_params(cfg, jax.random.key(0))
  layers = params["layers"]
  np.testing.assert_allclose(layers["post_attn_norm"]["scale"], 0.283 / math.sqrt(8), rtol=1e-6)
  np.testing.assert_allclose(layers["post_mlp_norm"]["scale"], 0.432 / math.sqrt(8), rtol=1e-6)
  np.testing.assert_array_equal(layers["pre_attn_norm"]["scale"], 1.0)
  sigma = math.sqrt(1 / (2 * 128 * 8))
  for w in (layers["attn"]["q"], layers["attn"]["o"], layers["mlp"]["down"], params["lm_head"]):
    assert abs(float(jnp.std(w)) / sigma - 1) < 0.05
  assert abs(float(jnp.std(params["embedding"])) / 0.5 - 1) < 0.05


def test_small_init_scales_residual_outputs_by_depth():
  cfg = models.tiny(n_layers=4, d_model=128, d_ff=512, init="small")
  layers = models.init_params(cfg, jax.random.key(0))["layers"]
  assert abs(float(jnp.std(layers["mlp"]["up"])) / math.sqrt(2 / (5 * 128)) - 1) < 0.05
  assert abs(float(jnp.std(layers["mlp"]["down"])) / math.sqrt(2 / (5 * 128 * 4)) - 1) < 0.05


def test_135b_parameter_count_matches_closed_form_and_paper():
  cfg = models.pangu_ultra_135b()
  d, f, v, n_layers = 12288, 28672, 153376, 94
  per_layer = 2 * d * d + 2 * d * 8 * 128 + 3 * d * f + 4 * d
  assert models.param_count(cfg) == n_layers * per_layer + 2 * v * d + d
  assert abs(models.param_count(cfg) / 135e9 - 1) < 0.01


@pytest.mark.parametrize("changes, elementwise", [
    ({}, 0.15),
    # XLA counts ~20 FLOPs per exact-GELU element (erf), and MoLE's experts run on every token.
    (dict(mlp_activation="gelu", mole=MoLEConfig(num_experts=3, expert_dim=64)), 0.25)])
def test_flop_counter_matches_xla_cost_analysis(changes, elementwise):
  # Unrolled: XLA's cost analysis counts a scan body once, not once per layer.
  cfg = models.tiny(n_layers=2, vocab_size=256, scan_layers=False, **changes)
  params = models.init_params(cfg, jax.random.key(0))
  tokens = jnp.zeros((1, 32), jnp.int32)
  cost = jax.jit(lambda p, t: models.forward(cfg, p, t)).lower(params, tokens).compile().cost_analysis()
  xla_flops = cost["flops"] if isinstance(cost, dict) else cost[0]["flops"]
  ours = models.forward_matmul_flops_per_token(cfg, 32) * 32
  # XLA also counts elementwise work (norms, softmax, RoPE), a few percent at this size.
  assert ours <= xla_flops < (1 + elementwise) * ours


def test_cross_entropy_matches_numpy_and_z_loss():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7))
  targets = rng.integers(0, 7, (2, 3))
  mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  lse = np.log(np.exp(logits).sum(-1))
  nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  want_ce = (nll * mask).sum() / mask.sum()
  want_z = (lse ** 2 * mask).sum() / mask.sum()
  loss, aux = models.cross_entropy_loss(jnp.asarray(logits, jnp.float32), targets, mask, z_loss=1e-2)
  np.testing.assert_allclose(aux["ce"], want_ce, rtol=1e-5)
  np.testing.assert_allclose(loss, want_ce + 1e-2 * want_z, rtol=1e-5)


@pytest.mark.parametrize("bad, field", [
    (dict(n_heads=6, n_kv_heads=4, head_dim=16), "n_kv_heads"),
    (dict(d_model=60, n_heads=8), "d_model"),
    (dict(norm_placement="post"), "norm_placement"),
    (dict(n_layers=0), "n_layers"),
    (dict(layer_shapes=(LayerShape(4, 2, 128),)), "layer_shapes"),
])
def test_bad_config_names_the_field(bad, field):
  with pytest.raises(ValueError, match=field):
    models.tiny(**bad)


def test_layer_shape_rejects_indivisible_heads():
  with pytest.raises(ValueError, match="n_kv_heads=3"):
    LayerShape(4, 3, 64)


def test_config_dict_round_trip():
  cfg = models.tiny(layer_shapes=(LayerShape(4, 2, 128), LayerShape(2, 1, 96)))
  assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
