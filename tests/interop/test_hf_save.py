"""save_pretrained: the inverse of load_pretrained, bit for bit, in HF's own tensor layout."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from pangu import infer, models
from pangu.interop import hf
from pangu.models import LayerShape

from safetensors_folder import folder_tensors

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _random_params(config: models.TransformerConfig, seed: int = 0) -> dict:
  """Host params drawn from N(0, 1) in each leaf's shape and dtype: no compile, and no 0/1 gains."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), nn.unbox(models.abstract_params(config)))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_resaving_a_fixture_reproduces_transformers_tensors(family, tmp_path):
  source = os.path.join(FIXTURES, family)
  config, params = hf.load_pretrained(source)
  hf.save_pretrained(config, params, tmp_path)
  ours, theirs = folder_tensors(tmp_path), folder_tensors(source)
  assert sorted(ours) == sorted(theirs)
  for name in theirs:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
  assert hf.load_pretrained(tmp_path)[0] == config


CONTEXT = dict(max_position_embeddings=512)
CONFIGS = {
    "non_uniform_qwen3": models.tiny(qk_norm=True, layer_shapes=(LayerShape(4, 2, 128), LayerShape(2, 1, 96)),
                                     **CONTEXT),
    "bf16_qwen2_tied": models.tiny(attention_bias=True, tie_embeddings=True, param_dtype="bfloat16",
                                   dtype="bfloat16", **CONTEXT),
    "llama3_rope_unrolled": models.tiny(scan_layers=False,
                                        rope_scaling=models.RopeScaling("llama3", 8.0, 1.0, 4.0, 64), **CONTEXT),
    "llama_biases_token_ids": models.tiny(attention_bias=True, attention_output_bias=True, mlp_bias=True,
                                          bos_token_id=1, eos_token_ids=(2, 7), **CONTEXT),
    "qwen3_biases_yarn": models.tiny(qk_norm=True, attention_bias=True, attention_output_bias=True,
                                     rope_scaling=models.RopeScaling("yarn", 4.0, original_max_position_embeddings=64,
                                                                     beta_fast=16.0, attention_factor=1.2),
                                     **CONTEXT),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_exact(name, tmp_path):
  config = CONFIGS[name]
  params = _random_params(config)
  hf.save_pretrained(config, params, tmp_path, max_shard_bytes=40_000)
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  loaded_config, loaded = hf.load_pretrained(tmp_path, scan_layers=config.scan_layers)
  assert loaded_config == config
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), want)


def test_config_json_carries_context_and_token_ids():
  hf_config = hf.config_to_hf(CONFIGS["llama_biases_token_ids"])
  assert hf_config["max_position_embeddings"] == 512
  assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (1, [2, 7])
  assert (hf_config["attention_bias"], hf_config["mlp_bias"]) == (True, True)
  unknown = hf.config_to_hf(models.tiny(eos_token_ids=(5,)))
  assert unknown["max_position_embeddings"] == hf.DEFAULT_MAX_POSITION_EMBEDDINGS
  assert "bos_token_id" not in unknown and unknown["eos_token_id"] == 5


def test_decode_layout_saves_the_training_layout_tensors(tmp_path):
  config = CONFIGS["llama_biases_token_ids"]
  params = _random_params(config)
  hf.save_pretrained(config, params, tmp_path / "training")
  decode_config, decode_params = infer.decode_layout(config, params)
  hf.save_pretrained(decode_config, decode_params, tmp_path / "decode")
  training, decode = folder_tensors(tmp_path / "training"), folder_tensors(tmp_path / "decode")
  assert sorted(training) == sorted(decode)
  for name in training:
    np.testing.assert_array_equal(decode[name], training[name], err_msg=name)
  assert (tmp_path / "training" / "config.json").read_text() == (tmp_path / "decode" / "config.json").read_text()


def test_non_uniform_shapes_go_to_an_extra_config_key(tmp_path):
  config = CONFIGS["non_uniform_qwen3"]
  hf.save_pretrained(config, _random_params(config), tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model_type"] == "qwen3"
  assert saved[hf.LAYER_SHAPES_KEY] == [{"n_heads": 4, "n_kv_heads": 2, "d_ff": 128},
                                        {"n_heads": 2, "n_kv_heads": 1, "d_ff": 96}]


def test_single_file_save_replaces_an_old_index(tmp_path):
  config = models.tiny()
  hf.save_pretrained(config, _random_params(config, seed=0), tmp_path, max_shard_bytes=40_000)
  params = _random_params(config, seed=1)
  hf.save_pretrained(config, params, tmp_path)
  assert not os.path.exists(tmp_path / "model.safetensors.index.json")
  np.testing.assert_array_equal(hf.load_pretrained(tmp_path)[1]["embedding"], params["embedding"])


@pytest.mark.parametrize("overrides, message", [
    (dict(norm_placement="sandwich"), "norm_placement='sandwich'"),
    (dict(attention_bias=True, qk_norm=True), "attention_output_bias=False matches no Hugging Face family"),
    (dict(attention_output_bias=True), "attention_bias=False with attention_output_bias=True"),
    (dict(qk_norm=True, mlp_bias=True), "qk_norm with mlp_bias"),
    (dict(mlp_activation="gelu"), "mlp_activation='gelu'"),
])
def test_configs_hf_cannot_express_are_refused(overrides, message, tmp_path):
  config = models.tiny(**overrides)
  with pytest.raises(ValueError, match=message):
    hf.save_pretrained(config, _random_params(config), tmp_path)
