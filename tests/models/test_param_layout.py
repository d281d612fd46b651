"""The `decode` kernel layout ([out, in]) against the `training` one: same logits, exact round trip, names."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from pangu import models
from pangu.models.param_layout import convert_param_layout
from pangu.models.transformer import unstack_layers

CONFIGS = {
    "scanned_llama_biases": models.tiny(attention_bias=True, attention_output_bias=True, mlp_bias=True),
    "unrolled_qwen3_tied_gelu": models.tiny(scan_layers=False, qk_norm=True, tie_embeddings=True,
                                            mlp_activation="gelu"),
}


def _random_params(config, seed=0):
  """Unit-scale weights, zero-free biases: every kernel and bias visibly moves the logits."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.normal(size=s.shape) / np.sqrt(s.shape[-1])).astype(s.dtype),
                      nn.unbox(models.abstract_params(config)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_layout_gives_the_training_logits_and_converts_back_exactly(name):
  config = CONFIGS[name]
  params = _random_params(config)
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 7)).astype(np.int32)
  decode_config, decode_params = convert_param_layout(config, params, "decode")
  assert decode_config == config.replace(param_layout="decode")
  np.testing.assert_allclose(models.forward(decode_config, decode_params, tokens),
                             models.forward(config, params, tokens), atol=1e-5, rtol=0)
  back_config, back = convert_param_layout(decode_config, decode_params, "training")
  assert back_config == config
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_decode_layout_stores_kernels_out_by_in_with_their_axis_names():
  config = models.tiny(scan_layers=False, mlp_bias=True)
  h, k, dh, d, f, v = config.n_heads, config.n_kv_heads, config.head_dim, config.d_model, config.d_ff, config.vocab_size
  params = _random_params(config)
  _, decode = convert_param_layout(config, params, "decode")
  layer, trained = decode["layer_0"], params["layer_0"]
  assert {name: layer["attn"][name].shape for name in "qkvo"} == {
      "q": (h, dh, d), "k": (k, dh, d), "v": (k, dh, d), "o": (d, h, dh)}
  assert (layer["mlp"]["gate"].shape, layer["mlp"]["down"].shape, decode["lm_head"].shape) == ((f, d), (d, f), (v, d))
  np.testing.assert_array_equal(layer["attn"]["o"], np.moveaxis(trained["attn"]["o"], -1, 0))
  np.testing.assert_array_equal(layer["mlp"]["gate_bias"], trained["mlp"]["gate_bias"])  # not a kernel: as is
  names = nn.get_partition_spec(models.abstract_params(config.replace(param_layout="decode")))
  assert tuple(names["layer_0"]["attn"]["q"]) == ("heads", "head_dim", "embed")
  assert tuple(names["lm_head"]) == ("vocab", "embed")


def test_conversion_follows_the_scan_axis():
  config = models.tiny()
  params = _random_params(config)
  decode_config, decode = convert_param_layout(config, params, "decode")
  unrolled_config, unrolled = convert_param_layout(config.replace(scan_layers=False),
                                                   unstack_layers(params, config.n_layers), "decode")
  jax.tree.map(np.testing.assert_array_equal, unstack_layers(decode, config.n_layers), unrolled)
  assert decode_config.replace(scan_layers=False) == unrolled_config


def test_bad_layouts_are_named():
  config = models.tiny()
  with pytest.raises(ValueError, match="param_layout"):
    config.replace(param_layout="transposed")
  with pytest.raises(ValueError, match="'transposed'"):
    convert_param_layout(config, _random_params(config), "transposed")
  with pytest.raises(ValueError, match="training layout"):
    convert_param_layout(config, _random_params(config.replace(scan_layers=False)), "decode")
