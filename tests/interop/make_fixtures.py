"""Writes the Hugging Face fixtures of tests/interop: tiny random Llama, Qwen2 and Qwen3 models and their logits,
and transformers' logits for the SlimLLM-pruned copies that pangu makes of them (pruned_fixtures.py).

Run by hand after changing a fixture, in three steps: torch and transformers in a venv of their own (the tests
need neither), pangu in the repo's:
  python3.11 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
  /tmp/tvenv/bin/python tests/interop/make_fixtures.py           # fixtures/<family>/
  PYTHONPATH=. .venv/bin/python tests/interop/pruned_fixtures.py  # fixtures/<family>_pruned/, by pangu
  /tmp/tvenv/bin/python tests/interop/make_fixtures.py --pruned  # their reference.npz, by transformers

Each fixtures/<family>/ holds what `save_pretrained` of transformers wrote (config.json + safetensors, float32)
and reference.npz: `tokens` [2, 24] with the reference `logits` [2, 24, V], plus a greedy continuation
(`prompt`, `prompt_mask` left-padded [2, 10], `generated` [2, 8]) from `generate`. Weights are drawn at unit
scale (not HF's 0.02), so that every layer visibly moves the logits, and the model settings cover what
load_pretrained translates: llama3 RoPE scaling, q/k/v/o and MLP biases and a sharded checkpoint (Llama),
q/k/v biases, linear RoPE scaling and tied embeddings (Qwen2), q/k norms, q/k/v/o biases, yarn RoPE scaling
and a head_dim that is not hidden_size / heads (Qwen3).

With --pruned, each fixtures/<family>_pruned/ is loaded with AutoModelForCausalLM (its architecture checked
against config.json's, no weight missing or unused) and reference.npz beside it gets the source fixture's
`tokens` and transformers' `logits` on them.
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_theta=10_000.0, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        rope_theta=1e6, tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        rope_theta=1e6, tie_word_embeddings=False, head_dim=32, attention_bias=True,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
}
# Per-family seeds, each chosen so that the greedy reference has no near-tie.
SEEDS = {"llama": 3, "qwen2": 1, "qwen3": 4}
# Llama is written in 100 KB shards to exercise model.safetensors.index.json.
SHARD_SIZE = {"llama": "100KB"}


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
  """Unit-scale weights: N(0, 1/fan_in) kernels, N(0, 1) embeddings, gains in [0.5, 1.5], N(0, 0.1) biases."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "layernorm" in name:
        p.copy_(0.5 + torch.rand(p.shape, generator=generator))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=generator))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=generator))
      else:
        p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)


def write_sources() -> None:
  for family, (config_cls, model_cls, options) in sorted(FAMILIES.items()):
    generator = torch.Generator().manual_seed(SEEDS[family])
    model = model_cls(config_cls(**SHAPE, **options)).float().eval()
    randomise(model, generator)
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 24), generator=generator)
    prompt = torch.randint(0, SHAPE["vocab_size"], (2, 10), generator=generator)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[0, :4] = 0  # row 0 is a 6-token prompt, left-padded
    with torch.no_grad():
      logits = model(tokens).logits
      result = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                              eos_token_id=None, return_dict_in_generate=True, output_scores=True)
    generated = result.sequences[:, prompt.shape[1]:]
    # A near-tie between the two best tokens would make the greedy reference fragile to rounding.
    margin = min(float((top[:, 0] - top[:, 1]).min()) for top in (s.topk(2).values for s in result.scores))
    if margin < 1e-3:
      raise RuntimeError(f"{family}: greedy margin {margin:.2g} is a near-tie; pick another seed")
    out = os.path.join(FIXTURES, family)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, max_shard_size=SHARD_SIZE.get(family, "50GB"))
    generation_config = os.path.join(out, "generation_config.json")  # generate() defaults, not the model
    if os.path.exists(generation_config):
      os.remove(generation_config)
    np.savez(os.path.join(out, "reference.npz"), tokens=tokens.numpy().astype(np.int32),
             logits=logits.numpy().astype(np.float32), prompt=prompt.numpy().astype(np.int32),
             prompt_mask=prompt_mask.numpy().astype(np.int32), generated=generated.numpy().astype(np.int32))
    print(family, sorted(os.listdir(out)), f"{sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))} bytes")


def write_pruned_references() -> None:
  for family in sorted(FAMILIES):
    path = os.path.join(FIXTURES, f"{family}_pruned")
    with open(os.path.join(path, "config.json")) as f:
      architecture = json.load(f)["architectures"][0]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                    output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if type(model).__name__ != architecture or problems:
      raise RuntimeError(f"{family}_pruned: transformers built {type(model).__name__} for {architecture}, {problems}")
    tokens = np.load(os.path.join(FIXTURES, family, "reference.npz"))["tokens"]
    with torch.no_grad():
      logits = model.eval()(torch.from_numpy(tokens).long()).logits
    np.savez(os.path.join(path, "reference.npz"), tokens=tokens, logits=logits.numpy().astype(np.float32))
    print(f"{family}_pruned", architecture, sorted(os.listdir(path)))


if __name__ == "__main__":
  if sys.argv[1:] == ["--pruned"]:
    write_pruned_references()
  else:
    write_sources()
