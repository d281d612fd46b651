"""load_pretrained against transformers' own outputs, stored in fixtures/ by make_fixtures.py (no torch here)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from pangu import infer, models
from pangu.interop import hf
from pangu.parallel import cpu_mesh, rules

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FAMILIES = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
  path = os.path.join(FIXTURES, request.param)
  config, params = hf.load_pretrained(path)
  return request.param, path, config, params, dict(np.load(os.path.join(path, "reference.npz")))


def test_config_translates_each_family(family):
  name, _, config, _, _ = family
  expected = {
      "llama": dict(attention_bias=True, attention_output_bias=True, mlp_bias=True, qk_norm=False,
                    tie_embeddings=False, head_dim=16, rope_theta=1e4, bos_token_id=1, eos_token_ids=(2,),
                    rope_scaling=models.RopeScaling("llama3", 4.0, 1.0, 4.0, 32)),
      "qwen2": dict(attention_bias=True, attention_output_bias=False, mlp_bias=False, qk_norm=False,
                    tie_embeddings=True, head_dim=16, rope_theta=1e6, rope_scaling=models.RopeScaling("linear", 2.0)),
      "qwen3": dict(attention_bias=True, attention_output_bias=True, mlp_bias=False, qk_norm=True,
                    tie_embeddings=False, head_dim=32, rope_theta=1e6, bos_token_id=None, eos_token_ids=(),
                    rope_scaling=models.RopeScaling("yarn", 4.0, original_max_position_embeddings=16)),
  }[name]
  assert {k: getattr(config, k) for k in expected} == expected
  assert (config.n_heads, config.n_kv_heads, config.d_ff, config.norm_eps) == (4, 2, 96, 1e-6)
  assert config.max_position_embeddings == 128


def test_logits_match_transformers(family):
  _, _, config, params, ref = family
  logits = np.asarray(models.forward(config, params, ref["tokens"]))
  assert np.abs(logits - ref["logits"]).max() <= 1e-4


@pytest.mark.parametrize("sharded", [False, True])
def test_left_padded_greedy_generation_matches_transformers(sharded):
  # One family: the cached path of biases, q/k norms and tied embeddings is checked in tests/infer.
  path = os.path.join(FIXTURES, "llama")
  mesh = cpu_mesh(data=2, fsdp=2, tensor=2) if sharded else None
  config, params = hf.load_pretrained(path, mesh=mesh)
  ref = np.load(os.path.join(path, "reference.npz"))
  prompts = [row[mask.astype(bool)].tolist() for row, mask in zip(ref["prompt"], ref["prompt_mask"])]
  gen = infer.GenerationConfig(max_new_tokens=ref["generated"].shape[1])
  out = infer.generate(config, params, prompts, gen, jax.random.key(0), mesh=mesh)
  np.testing.assert_array_equal(np.stack(out), ref["generated"])


def test_sharded_load_streams_into_the_rules_shardings():
  path = os.path.join(FIXTURES, "llama")
  config, params = hf.load_pretrained(path)
  mesh = cpu_mesh(data=2, fsdp=2, tensor=2)
  _, sharded = hf.load_pretrained(path, mesh=mesh)
  assert jax.tree.map(lambda x: x.sharding, sharded) == rules.param_shardings(models.abstract_params(config), mesh)
  jax.tree.map(np.testing.assert_array_equal, sharded, params)


def _copy_fixture(tmp_path, name="llama"):
  target = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), target)
  return target


def _edit_config(folder, **changes):
  config_path = folder / "config.json"
  data = json.loads(config_path.read_text())
  data.update(changes)
  config_path.write_text(json.dumps(data))


def test_unknown_architecture_is_named(tmp_path):
  folder = _copy_fixture(tmp_path)
  _edit_config(folder, model_type="mixtral", architectures=["MixtralForCausalLM"])
  with pytest.raises(hf.CheckpointFormatError, match="model_type='mixtral'.*MixtralForCausalLM"):
    hf.load_pretrained(folder)


def test_unsupported_rope_type_is_named(tmp_path):
  folder = _copy_fixture(tmp_path)
  _edit_config(folder, rope_parameters={"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4})
  with pytest.raises(hf.CheckpointFormatError, match="'longrope'"):
    hf.load_pretrained(folder)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  folder = _copy_fixture(tmp_path)
  index_path = folder / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
  index_path.write_text(json.dumps(index))
  _edit_config(folder, num_hidden_layers=1)  # layer 1's tensors are now extra, and one is gone from the map
  with pytest.raises(hf.CheckpointFormatError, match=r"unexpected \['model.layers.1.input_layernorm.weight'"):
    hf.load_pretrained(folder)
  _edit_config(folder, num_hidden_layers=3)
  with pytest.raises(hf.CheckpointFormatError, match=r"missing \['model.layers.1.mlp.up_proj.weight', "
                                                     r"'model.layers.2.input_layernorm.weight'"):
    hf.load_pretrained(folder)


def test_shape_mismatch_is_named(tmp_path):
  folder = _copy_fixture(tmp_path, "qwen3")
  _edit_config(folder, head_dim=16)
  with pytest.raises(hf.CheckpointFormatError, match=r"model.layers.0.self_attn.q_proj.weight has shape "
                                                     r"\[128, 64\], config expects \[64, 64\]"):
    hf.load_pretrained(folder)


def test_unsupported_options_are_named(tmp_path):
  folder = _copy_fixture(tmp_path)
  _edit_config(folder, use_sliding_window=True, hidden_act="gelu")
  with pytest.raises(hf.CheckpointFormatError, match="hidden_act='gelu', use_sliding_window=true"):
    hf.load_pretrained(folder)
