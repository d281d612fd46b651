"""The multi-token-prediction block: its logits against a float64 NumPy reference, and its config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import models
from pangu.models.transformer import Decoder

import reference_decoder as ref


def _block(x, lp, cfg, positions):
  """One pre-norm decoder layer in float64 (reference_decoder's pieces)."""
  h = ref.attention(ref.rms_norm(x, lp["pre_attn_norm"]["scale"], cfg.norm_eps), lp["attn"], cfg.n_heads,
                    cfg.n_kv_heads, cfg.rope_theta, cfg.norm_eps, cfg.qk_norm, cfg.attention_bias, positions)
  x = x + h
  return x + ref.mlp(ref.rms_norm(x, lp["pre_mlp_norm"]["scale"], cfg.norm_eps), lp["mlp"])


def reference_mtp_logits(cfg, params, tokens):
  """MTP logits [S - 1, V] of tokens [S]: position s reads the main model's last hidden state at s and the
  embedding of token s+1, and predicts token s+2."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  positions = np.arange(len(tokens))
  x = p["embedding"][tokens]
  for i in range(cfg.n_layers):
    x = _block(x, p[f"layer_{i}"], cfg, positions)
  hidden, nxt = x[:-1], p["embedding"][tokens[1:]]
  joined = np.concatenate([ref.rms_norm(hidden, p["mtp_hidden_norm"]["scale"], cfg.norm_eps),
                           ref.rms_norm(nxt, p["mtp_embed_norm"]["scale"], cfg.norm_eps)], -1)
  y = _block(joined @ p["mtp_proj"], p["mtp_block"], cfg, positions[:-1])
  return ref.rms_norm(y, p["mtp_head_norm"]["scale"], cfg.norm_eps) @ p["lm_head"]


def test_mtp_logits_match_float64_reference():
  cfg = models.tiny(mtp_layers=1, scan_layers=False, attention_implementation="xla")
  params = models.init_params(cfg, jax.random.key(0))
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), params)
  tokens = np.array([4, 8, 15, 16, 23, 42, 7, 99], np.int32)

  def mtp(module, tokens):
    _, _, state = module.run(tokens[:, :-1])
    return module.mtp_logits(state.x, tokens[:, 1:])

  got = Decoder(cfg).apply({"params": params}, jnp.asarray(tokens[None]), method=mtp)[0]
  np.testing.assert_allclose(got, reference_mtp_logits(cfg, params, tokens), rtol=2e-5, atol=2e-5)
  # The plain forward is unchanged by the MTP params.
  plain = {k: v for k, v in params.items() if not k.startswith("mtp_")}
  np.testing.assert_array_equal(models.forward(cfg, params, tokens[None]),
                                models.forward(cfg.replace(mtp_layers=0), plain, tokens[None]))


def test_mtp_params_are_one_block_a_projection_and_three_norms():
  cfg = models.tiny(mtp_layers=1, scan_layers=False)
  d = cfg.d_model
  extra = models.param_count(cfg) - models.param_count(cfg.replace(mtp_layers=0))
  block = models.param_count(cfg.replace(mtp_layers=0)) - models.param_count(cfg.replace(mtp_layers=0, n_layers=1))
  assert extra == block + 2 * d * d + 3 * d  # hidden, embedding and output norms


@pytest.mark.parametrize("bad", [dict(mtp_layers=2), dict(mtp_layers=True)])
def test_mtp_layers_checked(bad):
  with pytest.raises(ValueError, match="mtp_layers"):
    models.tiny(**bad)
