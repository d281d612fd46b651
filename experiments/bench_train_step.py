"""Tokens/s and model FLOP utilisation of the small preset's full train step, beside a matmul ceiling and
Hugging Face transformers' Llama (PyTorch) training the same architecture, all measured in this one run.

  python -m experiments.bench_train_step --quick

Writes results/bench_train_step.json: {"tokens_per_s", "mfu", "matmul_flops_per_s", "shape": {...},
"torch": {"tokens_per_s", ...} | {"skipped": reason}, "speedup_vs_torch"} and bench_train_step.png.
MFU = train matmul FLOPs per token (pangu.models.train_flops_per_token) x tokens/s / the best f32 matmul
FLOP/s measured here, so it is a fraction of what this machine's matmuls reach, not of a datasheet peak.
"""

import os
import time

from absl import app, flags

from experiments import common

_BATCH = flags.DEFINE_integer("batch", 8, "Global batch (sequences).", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq", 256, "Sequence length.", lower_bound=8)
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps (default 10, --quick 4).", lower_bound=1)
_DATA_PARALLEL = flags.DEFINE_bool("data_parallel", False, "Split the batch over every device; by default one "
                                   "device runs the step (on CPU, XLA's thread pool uses every core for it).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time transformers' LlamaForCausalLM (skipped if not installed).")


def _timed(fn, steps: int) -> float:
  """Median seconds per call over `steps` calls after one warm-up call (compile)."""
  fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def matmul_ceiling(n: int = 2048, steps: int = 5) -> float:
  """Best f32 FLOP/s of one n x n x n matmul on the default device."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n ** 3 / _timed(lambda: f(a).block_until_ready(), steps)


def jax_train_tokens_per_s(model, batch: int, seq: int, steps: int) -> float:
  import jax
  import numpy as np

  from pangu.parallel import cpu_mesh, single_device_mesh
  from pangu.train.config import TrainConfig
  from pangu.train.step import init_train_state, make_train_step

  mesh = (cpu_mesh(data=len(jax.devices())) if _DATA_PARALLEL.value
          else single_device_mesh())
  train_config = TrainConfig(warmup_steps=1, total_steps=1000)
  state = [init_train_state(model, train_config, jax.random.key(0), mesh)]
  step = make_train_step(model, train_config, mesh)
  toks = np.random.default_rng(0).integers(0, model.vocab_size, (batch, seq + 1)).astype(np.int32)
  data = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": np.ones((batch, seq), np.float32)}

  def run():
    state[0], metrics = step(state[0], data)
    metrics["loss"].block_until_ready()

  return batch * seq / _timed(run, steps)


def torch_train_tokens_per_s(model, batch: int, seq: int, steps: int) -> dict:
  try:
    import torch
    import transformers
  except ImportError as e:
    return {"skipped": f"torch/transformers not installed ({e}); pip install -e '.[bench]' to compare"}
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  hf_config = transformers.LlamaConfig(
      vocab_size=model.vocab_size, hidden_size=model.d_model, intermediate_size=model.d_ff,
      num_hidden_layers=model.n_layers, num_attention_heads=model.n_heads, num_key_value_heads=model.n_kv_heads,
      head_dim=model.head_dim, rope_theta=model.rope_theta, rms_norm_eps=model.norm_eps, tie_word_embeddings=False,
      attn_implementation="sdpa")
  net = transformers.LlamaForCausalLM(hf_config).float().train()
  opt = torch.optim.AdamW(net.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
  toks = torch.randint(0, model.vocab_size, (batch, seq + 1))

  def run():
    out = net(input_ids=toks[:, :-1], labels=toks[:, :-1].clone())
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  return {"tokens_per_s": batch * seq / _timed(run, steps), "torch": torch.__version__,
          "transformers": transformers.__version__, "threads": torch.get_num_threads()}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from pangu import models

  model = models.small()
  batch, seq = _BATCH.value, _SEQ.value
  steps = common.pick(_STEPS, 10, 4)
  ceiling = matmul_ceiling()
  tokens_per_s = jax_train_tokens_per_s(model, batch, seq, steps)
  flops_per_token = models.train_flops_per_token(model, seq)
  torch_result = torch_train_tokens_per_s(model, batch, seq, steps) if _TORCH.value else {"skipped": "--notorch"}
  result = {
      "tokens_per_s": tokens_per_s,
      "mfu": flops_per_token * tokens_per_s / ceiling,
      "matmul_flops_per_s": ceiling,
      "model_flops_per_s": flops_per_token * tokens_per_s,
      "shape": {"d_model": model.d_model, "n_layers": model.n_layers, "n_heads": model.n_heads,
                "n_kv_heads": model.n_kv_heads, "d_ff": model.d_ff, "vocab": model.vocab_size, "batch": batch,
                "seq": seq},
      "torch": torch_result,
      "speedup_vs_torch": (tokens_per_s / torch_result["tokens_per_s"]) if "tokens_per_s" in torch_result else None,
      "data_parallel": _DATA_PARALLEL.value,
      "machine": common.machine_info(),
  }
  common.write_json("bench_train_step", result)
  fig, axes = common.new_figure()
  names = ["pangu (JAX)"] + (["transformers (PyTorch)"] if "tokens_per_s" in torch_result else [])
  values = [tokens_per_s] + ([torch_result["tokens_per_s"]] if "tokens_per_s" in torch_result else [])
  axes[0, 0].bar(names, values)
  axes[0, 0].set(ylabel="train tokens/s", title=f"small preset, batch {batch} x seq {seq}, CPU")
  common.save_figure(fig, "bench_train_step")
  common.write_table("bench_train_step", common.format_table([{
      "tokens_per_s": tokens_per_s, "mfu": result["mfu"], "matmul_GFLOP/s": ceiling / 1e9,
      "torch_tokens_per_s": torch_result.get("tokens_per_s", torch_result.get("skipped")),
      "speedup_vs_torch": result["speedup_vs_torch"]}],
      ["tokens_per_s", "mfu", "matmul_GFLOP/s", "torch_tokens_per_s", "speedup_vs_torch"]))


if __name__ == "__main__":
  app.run(main)
