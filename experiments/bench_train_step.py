"""Tokens/s and model FLOP utilisation of the small preset's full train step, beside a matmul ceiling and
Hugging Face transformers' Llama (PyTorch) training the same architecture, all measured in this one run.

  python -m experiments.bench_train_step --quick

Everything is timed round-robin in one process (`common.interleaved_seconds`): per round one train step of each
of our layouts (layers scanned, the default, and unrolled), one step of transformers, and one f32 matmul whose
best FLOP/s over the rounds is the ceiling, so machine load that comes and goes hits every contender alike.
Our tokens/s is the faster layout's median; both are listed. MFU = train matmul FLOPs per token
(pangu.models.train_flops_per_token) x tokens/s / the ceiling: a fraction of what this machine's matmuls reach,
not of a datasheet peak. `bound_speedup_vs_torch` is the most any implementation doing these FLOPs could gain on
transformers here (ceiling / transformers' matmul FLOP/s): a goal above it cannot be met in float32 on this
machine. One more step is traced with the JAX profiler: the share of the XLA ops that are matmuls, and the top
ops, say where the time goes.

Writes results/bench_train_step.json: {"tokens_per_s", "mfu", "matmul_flops_per_s", "layouts": {name:
{"tokens_per_s", "step_s"}}, "shape": {...}, "torch": {"tokens_per_s", "mfu", ...} | {"skipped": reason},
"speedup_vs_torch", "bound_speedup_vs_torch", "goal": {"speedup_vs_torch", "met"}, "profile": {...}},
bench_train_step.png and bench_train_step.md.
"""

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import statistics
import tempfile

from absl import app, flags

from experiments import common

_BATCH = flags.DEFINE_integer("batch", 8, "Global batch (sequences).", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq", 256, "Sequence length.", lower_bound=8)
_ROUNDS = flags.DEFINE_integer("rounds", None, "Timed rounds (default 10, --quick 4).", lower_bound=1)
_DATA_PARALLEL = flags.DEFINE_bool("data_parallel", False, "Split the batch over every device; by default one "
                                   "device runs the step (on CPU, XLA's thread pool uses every core for it).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time transformers' LlamaForCausalLM (skipped if not installed).")
_PROFILE = flags.DEFINE_bool("profile", True, "Trace one extra step of the default layout with the JAX profiler.")

GOAL_SPEEDUP_VS_TORCH = 1.5  # issue 11
CEILING_N = 2048
# Our layouts: TransformerConfig overrides (the scanned stack is the library default).
LAYOUTS = {"scanned": {}, "unrolled": {"scan_layers": False}}


def matmul_step():
  """One f32 CEILING_N^3 matmul on the default device (a thunk) and its FLOPs."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (CEILING_N, CEILING_N), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return (lambda: f(a)), 2 * CEILING_N ** 3


def lm_batch(model, batch: int, seq: int) -> dict:
  import numpy as np
  toks = np.random.default_rng(0).integers(0, model.vocab_size, (batch, seq + 1)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": np.ones((batch, seq), np.float32)}


def jax_train_step(model, batch: int, seq: int):
  """A thunk running one train step of `model` on a fixed batch (the state carried between calls)."""
  import jax

  from pangu.parallel import cpu_mesh, single_device_mesh
  from pangu.train.config import TrainConfig
  from pangu.train.step import init_train_state, make_train_step

  mesh = cpu_mesh(data=len(jax.devices())) if _DATA_PARALLEL.value else single_device_mesh()
  train_config = TrainConfig(warmup_steps=1, total_steps=1000)
  state = [init_train_state(model, train_config, jax.random.key(0), mesh)]
  step = make_train_step(model, train_config, mesh)
  data = lm_batch(model, batch, seq)

  def run():
    state[0], metrics = step(state[0], data)
    return metrics["loss"]

  return run


def torch_train_step(model, batch: int, seq: int):
  """(thunk, versions) for transformers' LlamaForCausalLM on the same shape, or (None, {"skipped": reason})."""
  try:
    import torch
    import transformers
  except ImportError as e:
    return None, {"skipped": f"torch/transformers not installed ({e}); pip install -e '.[bench]' to compare"}
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

  return run, {"torch": torch.__version__, "transformers": transformers.__version__,
               "threads": torch.get_num_threads()}


def profile_step(run, top: int = 12) -> dict:
  """Traces one call of `run` and sums the XLA op events: the matmul (dot) share and the `top` costliest op
  kinds. Tracing slows every op, so the shares, not the milliseconds, are the finding."""
  import jax
  folder = tempfile.mkdtemp(prefix="bench_train_step_trace_")
  jax.block_until_ready(run())
  with jax.profiler.trace(folder):
    jax.block_until_ready(run())
  files = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    return {"skipped": "the profiler wrote no trace"}
  with gzip.open(files[0]) as f:
    events = json.load(f)["traceEvents"]
  kinds = collections.Counter()
  for e in events:  # op events; executor, thread-pool and profiler bookkeeping events left out
    if e.get("ph") == "X" and not re.match(r"(ThunkExecutor|SlinkyThreadPool|end: |\$|while)", e["name"]):
      kinds[re.sub(r"\.\d+$", "", e["name"])] += e["dur"]
  total = sum(kinds.values())
  dots = sum(us for kind, us in kinds.items() if re.search(r"dot|ynn_fusion|xnn_fusion|onednn", kind))
  return {"dot_fraction": dots / total, "op_ms": total / 1e3,
          "top": [{"op": kind, "share": us / total} for kind, us in kinds.most_common(top)]}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from pangu import models

  model = models.small()
  batch, seq = _BATCH.value, _SEQ.value
  rounds = common.pick(_ROUNDS, 10, 4)
  tokens = batch * seq
  flops_per_token = models.train_flops_per_token(model, seq)
  matmul, matmul_flops = matmul_step()
  contenders = {name: jax_train_step(dataclasses.replace(model, **overrides), batch, seq)
                for name, overrides in LAYOUTS.items()}
  torch_run, torch_info = torch_train_step(model, batch, seq) if _TORCH.value else (None, {"skipped": "--notorch"})
  if torch_run is not None:
    contenders["torch"] = torch_run
  contenders["matmul"] = matmul
  times = common.interleaved_seconds(contenders, rounds)

  ceiling = matmul_flops / min(times["matmul"])
  layouts = {name: {"step_s": statistics.median(times[name]), "tokens_per_s": tokens / statistics.median(times[name])}
             for name in LAYOUTS}
  tokens_per_s = max(v["tokens_per_s"] for v in layouts.values())
  torch_result = dict(torch_info)
  if torch_run is not None:
    torch_tokens = tokens / statistics.median(times["torch"])
    torch_result |= {"tokens_per_s": torch_tokens, "mfu": flops_per_token * torch_tokens / ceiling}
  speedup = tokens_per_s / torch_result["tokens_per_s"] if "tokens_per_s" in torch_result else None
  bound = 1 / torch_result["mfu"] if "mfu" in torch_result else None
  result = {
      "tokens_per_s": tokens_per_s,
      "mfu": flops_per_token * tokens_per_s / ceiling,
      "matmul_flops_per_s": ceiling,
      "model_flops_per_s": flops_per_token * tokens_per_s,
      "layouts": layouts,
      "shape": {"d_model": model.d_model, "n_layers": model.n_layers, "n_heads": model.n_heads,
                "n_kv_heads": model.n_kv_heads, "d_ff": model.d_ff, "vocab": model.vocab_size, "batch": batch,
                "seq": seq, "train_flops_per_token": flops_per_token},
      "rounds": rounds,
      "torch": torch_result,
      "speedup_vs_torch": speedup,
      "bound_speedup_vs_torch": bound,
      "goal": {"speedup_vs_torch": GOAL_SPEEDUP_VS_TORCH,
               "met": None if speedup is None else speedup >= GOAL_SPEEDUP_VS_TORCH,
               "reachable_here": None if bound is None else bound >= GOAL_SPEEDUP_VS_TORCH},
      "profile": profile_step(contenders["scanned"]) if _PROFILE.value else {"skipped": "--noprofile"},
      "data_parallel": _DATA_PARALLEL.value,
      "machine": common.machine_info(),
  }
  common.write_json("bench_train_step", result)

  fig, axes = common.new_figure()
  bars = {f"pangu ({name})": v["tokens_per_s"] for name, v in layouts.items()}
  if "tokens_per_s" in torch_result:
    bars["transformers"] = torch_result["tokens_per_s"]
    bars["matmul ceiling"] = ceiling / flops_per_token
  axes[0, 0].bar(list(bars), list(bars.values()))
  axes[0, 0].set(ylabel="train tokens/s", title=f"small preset, batch {batch} x seq {seq}, CPU")
  axes[0, 0].tick_params(axis="x", labelrotation=20)
  common.save_figure(fig, "bench_train_step")
  row = {"tokens_per_s": tokens_per_s, "mfu": result["mfu"], "matmul_GFLOP/s": ceiling / 1e9,
         **{f"{name}_tokens_per_s": v["tokens_per_s"] for name, v in layouts.items()},
         "torch_tokens_per_s": torch_result.get("tokens_per_s", torch_result.get("skipped")),
         "torch_mfu": torch_result.get("mfu"), "speedup_vs_torch": speedup, "bound_speedup_vs_torch": bound,
         "dot_share_of_ops": result["profile"].get("dot_fraction")}
  common.write_table("bench_train_step", common.format_table([row], list(row)))


if __name__ == "__main__":
  app.run(main)
