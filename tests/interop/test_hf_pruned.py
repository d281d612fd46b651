"""A Hugging Face model pruned by SlimLLM (the same ratio in every layer) saves as a standard folder that
transformers loads: pruned_fixtures.py's recipe, re-run here, reproduces the committed fixtures/<family>_pruned/
folders that transformers loaded, and pangu's logits after reloading equal the ones transformers stored there."""

import json
import os

import numpy as np
import pytest

from pangu import models
from pangu.interop import hf

from pruned_fixtures import ARCHITECTURES, FAMILIES, FIXTURES, prune_fixture, pruned_path
from safetensors_folder import folder_tensors


def _config_json(folder) -> dict:
  with open(os.path.join(folder, hf.CONFIG_FILE)) as f:
    return json.load(f)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_folder_is_what_transformers_loaded(family, tmp_path):
  config, params = prune_fixture(family)
  assert config.is_uniform and config.n_heads < 4 and config.d_ff < 96  # really smaller, same shape everywhere
  hf.save_pretrained(config, params, tmp_path)
  committed = pruned_path(family)
  saved = _config_json(tmp_path)
  assert saved == _config_json(committed) and saved["architectures"] == [ARCHITECTURES[family]]
  ours, theirs = folder_tensors(tmp_path), folder_tensors(committed)
  assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
  for name in theirs:  # re-running the calibration may round differently in the last bits, not more
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)
  reference = np.load(os.path.join(committed, "reference.npz"))
  loaded_config, loaded = hf.load_pretrained(tmp_path, scan_layers=config.scan_layers)
  assert loaded_config == config
  logits = np.asarray(models.forward(loaded_config, loaded, reference["tokens"]))
  np.testing.assert_array_equal(logits, np.asarray(models.forward(config, params, reference["tokens"])))
  assert np.abs(logits - reference["logits"]).max() <= 1e-4


def test_recovery_biases_are_carried_where_the_family_can():
  """Llama's attention_bias / mlp_bias switches hold the o_proj / down_proj recovery biases (q/k/v and gate/up
  zeros where the source had none); Qwen3 has no MLP biases, so its FFN refit added none."""
  llama, qwen2, qwen3 = (folder_tensors(pruned_path(f)) for f in ("llama", "qwen2", "qwen3"))
  sources = {f: folder_tensors(os.path.join(FIXTURES, f)) for f in ("llama", "qwen2", "qwen3")}
  assert "model.layers.0.self_attn.o_proj.bias" not in sources["qwen2"]
  assert np.abs(qwen2["model.layers.0.self_attn.o_proj.bias"]).max() > 0  # the attention recovery's intercept
  assert np.abs(qwen2["model.layers.0.mlp.down_proj.bias"]).max() > 0
  np.testing.assert_array_equal(qwen2["model.layers.0.mlp.gate_proj.bias"], 0)
  for name in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):  # the source's biases plus the intercepts
    assert not np.array_equal(llama[f"model.layers.0.{name}"], sources["llama"][f"model.layers.0.{name}"])
  assert not any(".mlp." in name and name.endswith(".bias") for name in qwen3)
  assert not np.array_equal(qwen3["model.layers.0.self_attn.o_proj.bias"],
                            sources["qwen3"]["model.layers.0.self_attn.o_proj.bias"])
