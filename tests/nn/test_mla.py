"""Multi-head latent attention: the training form against a float64 NumPy reference, the absorbed decode form
against the training form, the latent cache's size, generation, and the 718B preset's parameter count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import infer, models
from pangu.infer import decoding
from pangu.infer.kv_cache import LatentLayerCache
from pangu.models.counting import param_count
from pangu.nn.attention import AttentionMask
from pangu.nn.mla import LatentDims, MLAConfig, MultiHeadLatentAttention
from pangu.sim.shapes import from_config, ultra_moe_718b

DIMS = {"q_lora": LatentDims(q_lora_rank=24, kv_lora_rank=16, qk_nope_dim=8, qk_rope_dim=4, v_head_dim=12),
        "no_q_lora": LatentDims(q_lora_rank=None, kv_lora_rank=20, qk_nope_dim=6, qk_rope_dim=8, v_head_dim=4)}


def _rms(x, g, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g


def _rope(x, positions, theta):
  """Rotate-half RoPE of x [S, N, P] in float64."""
  p = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, p, 2) / p)
  ang = positions[:, None, None] * inv
  a, b = x[..., :p // 2], x[..., p // 2:]
  return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1)


def reference_mla(params, x, cfg: MLAConfig):
  """The published training form in float64 for one row x [S, D], causal."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  d, s = cfg.dims, x.shape[0]
  pos = np.arange(s)
  if d.q_lora_rank is None:
    q = np.einsum("sd,dhk->shk", x, p["q"])
  else:
    q = np.einsum("sq,qhk->shk", _rms(x @ p["q_down"], p["q_norm"], cfg.norm_eps), p["q_up"])
  q = np.concatenate([q[..., :d.qk_nope_dim], _rope(q[..., d.qk_nope_dim:], pos, cfg.rope_theta)], -1)
  latent = x @ p["kv_down"]
  c = _rms(latent[:, :d.kv_lora_rank], p["kv_norm"], cfg.norm_eps)
  k_rope = _rope(latent[:, None, d.kv_lora_rank:], pos, cfg.rope_theta)
  kv = np.einsum("sr,rhk->shk", c, p["kv_up"])
  k = np.concatenate([kv[..., :d.qk_nope_dim], np.broadcast_to(k_rope, (s, cfg.n_heads, d.qk_rope_dim))], -1)
  v = kv[..., d.qk_nope_dim:]
  scores = np.einsum("shk,thk->hst", q, k) / np.sqrt(d.qk_dim)
  scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("hst,thv->shv", probs, v)
  return np.einsum("shv,hvd->sd", out, p["o"])


@pytest.mark.parametrize("name", ["q_lora", pytest.param("no_q_lora", marks=pytest.mark.slow)])
def test_training_form_matches_float64_reference(name):
  cfg = MLAConfig(d_model=32, n_heads=3, dims=DIMS[name], rope_theta=500.0, implementation="xla")
  x = jax.random.normal(jax.random.key(0), (2, 7, 32))
  mask = AttentionMask.self_attention(jnp.broadcast_to(jnp.arange(7), (2, 7)))
  module = MultiHeadLatentAttention(cfg, kernel_init=nn.initializers.normal(0.3), output_init=nn.initializers.normal(0.3))
  params = nn.unbox(module.init(jax.random.key(1), x, mask)["params"])
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)  # non-unit gains
  got, _ = module.apply({"params": params}, x, mask)
  for row in range(2):
    np.testing.assert_allclose(got[row], reference_mla(params, np.asarray(x[row], np.float64), cfg), rtol=2e-5,
                               atol=2e-5)


def _mla_model(**overrides):
  return models.tiny(n_heads=4, n_kv_heads=4, mla=DIMS["q_lora"], attention_implementation="xla", **overrides)


@pytest.mark.parametrize("scan_layers", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_absorbed_decoding_gives_training_logits(scan_layers):
  """Prefill half the tokens into the latent cache, then one token at a time: every logit equals the
  training form's (no cache) at 1e-5 in float32."""
  config = _mla_model(scan_layers=scan_layers)
  params = models.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, config.vocab_size)
  expected = models.forward(config, params, tokens)
  cache = infer.init_cache(config, jnp.zeros((2,), jnp.int32), 10)
  assert isinstance(jax.tree.leaves(cache.layers, is_leaf=lambda c: isinstance(c, LatentLayerCache))[0],
                    LatentLayerCache)
  got, cache = infer.extend(config, params, tokens[:, :5], cache)
  steps = [got]
  for s in range(5, 10):
    logits, cache = infer.extend(config, params, tokens[:, s:s + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), expected, rtol=1e-5, atol=1e-5)


def test_latent_cache_holds_rank_plus_rope_values_per_token_and_layer():
  config = _mla_model()
  cache = infer.init_cache(config, jnp.zeros((3,), jnp.int32), 11)
  dims = config.mla
  sizes = [leaf.size for leaf in jax.tree.leaves(cache.layers) if jnp.issubdtype(leaf.dtype, jnp.floating)]
  assert sum(sizes) == config.n_layers * 3 * 11 * (dims.kv_lora_rank + dims.qk_rope_dim)
  assert infer.cache_bytes(config, 3, 11) == sum(sizes) * 4


PROMPTS = [[5, 9, 2, 7], [11, 3]]


def _check_greedy(config, params, outputs):
  for prompt, out in zip(PROMPTS, outputs):
    assert len(out) == 6
    sequence = jnp.asarray([prompt + list(out)], jnp.int32)
    greedy = jnp.argmax(models.forward(config, params, sequence)[0, len(prompt) - 1:-1], -1)
    np.testing.assert_array_equal(out, greedy)


def test_generation_with_mla_is_greedy_argmax_of_the_full_forward():
  """The engine (left-padded prefill into latent caches, then the decode loop) emits the argmax of the
  training form's logits over prompt + output."""
  config = _mla_model()
  params = models.init_params(config, jax.random.key(3))
  gen = decoding.GenerationConfig(max_new_tokens=6)
  _check_greedy(config, params, decoding.generate(config, params, PROMPTS, gen, jax.random.key(0)))


@pytest.mark.slow
def test_generation_with_mla_in_the_decode_layout():
  """Kernels stored [out, in] and layers unrolled (`decode_layout`): the absorbed form reads kv_up transposed."""
  config = _mla_model()
  params = models.init_params(config, jax.random.key(3))
  decode_config, decode_params = decoding.decode_layout(config, params)
  gen = decoding.GenerationConfig(max_new_tokens=6)
  _check_greedy(config, params, decoding.generate(decode_config, decode_params, PROMPTS, gen, jax.random.key(0)))


def test_ultra_moe_718b_param_count_equals_simulator_shape_count():
  preset = models.pangu_ultra_moe_718b()
  assert param_count(preset) == ultra_moe_718b().param_count()
  assert from_config(preset).replace(name="ultra-moe-718b", mtp_layers=1) == ultra_moe_718b()


@pytest.mark.parametrize("bad", [dict(n_kv_heads=2), dict(qk_norm=True), dict(attention_bias=True),
                                 dict(sliding_window=4)])
def test_mla_rejects_gqa_options_by_name(bad):
  name = next(iter(bad))
  with pytest.raises(ValueError, match=name):
    models.tiny(**{"n_heads": 4, "n_kv_heads": 4, "mla": DIMS["q_lora"], **bad})


def test_latent_dims_name_bad_fields():
  with pytest.raises(ValueError, match="qk_rope_dim"):
    LatentDims(q_lora_rank=8, kv_lora_rank=8, qk_nope_dim=4, qk_rope_dim=3, v_head_dim=4)
  with pytest.raises(ValueError, match="kv_lora_rank"):
    LatentDims(q_lora_rank=8, kv_lora_rank=0, qk_nope_dim=4, qk_rope_dim=2, v_head_dim=4)


def test_mla_matmul_flops_count_every_attention_kernel_once():
  """Per token, the projections cost 2 FLOPs per weight of the layer's kernels (read off the params); the
  scores and the weighted values 2 S H (N + P) + 2 S H V."""
  config = _mla_model(scan_layers=False)
  dense = config.replace(mla=None, n_kv_heads=config.n_heads)
  params = models.abstract_params(config)
  attn_weights = sum(int(np.prod(leaf.value.shape)) for layer in range(config.n_layers)
                     for name, leaf in params[f"layer_{layer}"]["attn"].items() if not name.endswith("norm"))
  dims, seq = config.mla, 32
  gqa_attention = config.n_layers * (2 * 4 * config.d_model * config.n_heads * dense.head_dim
                                     + 4 * seq * config.n_heads * dense.head_dim)
  expected = (models.forward_matmul_flops_per_token(dense, seq) - gqa_attention + 2 * attn_weights
              + config.n_layers * 2 * seq * config.n_heads * (dims.qk_dim + dims.v_head_dim))
  assert models.forward_matmul_flops_per_token(config, seq) == pytest.approx(expected)
