"""Prefill and decode tokens/s of pangu.infer on the small preset, beside Hugging Face transformers (PyTorch)
running the very same weights on CPU in the same run.

  python -m experiments.bench_decode --quick

The small preset with random weights is exported with pangu.interop.hf.save_pretrained; pangu reads it back
with load_pretrained into its decode layout (pangu.infer.decode_layout: layers unrolled, kernels stored
[out, in]) and transformers with LlamaForCausalLM.from_pretrained, so both run identical float32 weights
(their greedy tokens are compared too). What is timed:
  prefill: one prompt of --prompt_len tokens -> first new token, KV cache filled (batch 1), PREFILL_CALLS
           times back to back per timed run, so that one run lasts about as long as a decode run.
  decode:  --new_tokens - 1 greedy steps after prefill, batch 1 and batch 8; tokens/s = batch * steps / time.
transformers' decode is a plain loop of model(token, past_key_values=...) + argmax, without generate()'s
per-step bookkeeping: the stricter baseline (generate() is timed beside it for reference).

Fairness on a shared CPU: each engine runs in its own worker process, in two thread settings (one thread, and
the library default of one per core); PyTorch's spinning OpenMP threads in particular lose several fold when
another job holds a core. The parent interleaves the timed runs of all workers, so load that comes and goes
hits every engine alike, and keeps per engine and metric the median over --repeats of its faster setting.
The 1-minute load average is recorded before and after.

SpeCache sweep (issue 16's decode-time goal, SpeCache <= 1.3x the full cache per token): the same model (the
small preset, decode layout, batch 1) decodes --specache_steps greedy tokens per call after a context of 1k, 2k,
4k and 8k tokens, with the full dense cache (`specache.cached_decode`, one row per step) and with SpeCache 1-bit,
g = 32, R = 64, k = 64, its full-precision store in pinned_host memory and the asynchronous prefetch
(`specache.specache_decode`, two rows per step: the real and the speculative token). Both are one compiled loop
over a donated cache. A step's cost depends only on the shapes, so the context is random keys and values
written into the cache rather than a prefill (which would take minutes per context on a CPU). The two run in
interleaved rounds (full, SpeCache, full, ...), each round `common.median_ms` of --repeats calls; the result is
the median over rounds, in ms per generated token, and ratio = specache_ms / full_ms.

Writes <results_dir>/bench_decode.json: {"ours": {"prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_b8"},
"transformers": {same keys, "generate_tok_s_b1", "generate_tok_s_b8"} | {"skipped": reason},
"speedup": {...}, "greedy_match": bool, "threads": {...}, "shape": {...}, "machine": {...},
"specache": {context: {"full_ms", "specache_ms", "ratio"}}, "specache_setup": {...}},
bench_decode.png and bench_decode.md.
"""

import importlib.util
import multiprocessing
import os
import statistics
import tempfile
import time

from absl import app, flags

from experiments import common

_PROMPT_LEN = flags.DEFINE_integer("prompt_len", None, "Prompt tokens (default 128, --quick 64).", lower_bound=1)
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", None, "Generated tokens (default 128, --quick 16).", lower_bound=2)
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed runs per measurement (default 5, --quick 3).", lower_bound=1)
_TORCH = flags.DEFINE_bool("torch", True, "Also time transformers' LlamaForCausalLM (skipped if not installed).")
_SPECACHE = flags.DEFINE_bool("specache", True, "Also run the SpeCache vs full-cache decode sweep.")
_SPECACHE_CONTEXTS = flags.DEFINE_list("specache_contexts", ["1024", "2048", "4096", "8192"],
                                       "Context lengths of the SpeCache sweep.")
_SPECACHE_STEPS = flags.DEFINE_integer("specache_steps", None, "Tokens per timed decode call (default 16, --quick 8).",
                                       lower_bound=1)
_SPECACHE_ROUNDS = flags.DEFINE_integer("specache_rounds", None, "Interleaved rounds (default 5, --quick 3).",
                                        lower_bound=1)

KEYS = ("prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_b8")
PREFILL_CALLS = 4
EXTRA_TORCH_KEYS = ("generate_tok_s_b1", "generate_tok_s_b8")
# XLA flags of the two pangu thread settings; one device, as a single-host decode runs.
_XLA_THREADS = {"default": "--xla_force_host_platform_device_count=1",
                "1": "--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false "
                     "intra_op_parallelism_threads=1"}


def _prompt(vocab: int, batch: int, length: int):
  import numpy as np
  return np.random.default_rng(batch).integers(0, vocab, (batch, length)).astype(np.int32)


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _pangu_runs(folder: str, prompt_len: int, new_tokens: int) -> tuple[dict, list]:
  """Metric -> a function that times one run (untimed set-up inside), and the batch-1 greedy tokens."""
  import jax
  import numpy as np

  from pangu import infer
  from pangu.interop import hf

  config, params = infer.decode_layout(*hf.load_pretrained(folder, scan_layers=False))
  gen = infer.GenerationConfig(max_new_tokens=new_tokens)
  rng = jax.random.key(0)

  def prefill(batch):
    return infer.prefill(config, gen, params, _prompt(config.vocab_size, batch, prompt_len),
                         np.zeros((batch,), np.int32), rng)

  def decode(batch):
    state = prefill(batch)
    state.last.block_until_ready()
    return _timed(lambda: infer.decode(config, gen, params, state).tokens.block_until_ready())

  def prefills():
    for _ in range(PREFILL_CALLS):
      prefill(1).last.block_until_ready()

  runs = {"prefill_tok_s": lambda: _timed(prefills), "decode_tok_s_b1": lambda: decode(1),
          "decode_tok_s_b8": lambda: decode(8)}
  greedy = np.asarray(infer.decode(config, gen, params, prefill(1)).tokens[0]).tolist()
  return runs, greedy


def _transformers_runs(folder: str, prompt_len: int, new_tokens: int) -> tuple[dict, list]:
  import torch
  import transformers

  model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  vocab = model.config.vocab_size

  def prefill(batch):
    result = model(torch.from_numpy(_prompt(vocab, batch, prompt_len)).long(), use_cache=True, logits_to_keep=1)
    return result.logits[:, -1].argmax(-1, keepdim=True), result.past_key_values

  def steps(token, cache):
    generated = [token]
    for _ in range(new_tokens - 1):
      result = model(token, past_key_values=cache, use_cache=True)
      token, cache = result.logits[:, -1].argmax(-1, keepdim=True), result.past_key_values
      generated.append(token)
    return torch.cat(generated, dim=1)

  def decode(batch):
    state = prefill(batch)
    return _timed(lambda: steps(*state))

  def generate(batch):
    tokens = torch.from_numpy(_prompt(vocab, batch, prompt_len)).long()
    return _timed(lambda: model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0))

  no_grad = torch.inference_mode()
  runs = {"prefill_tok_s": no_grad(lambda: _timed(lambda: [prefill(1) for _ in range(PREFILL_CALLS)])),
          "decode_tok_s_b1": no_grad(lambda: decode(1)),
          "decode_tok_s_b8": no_grad(lambda: decode(8)), "generate_tok_s_b1": no_grad(lambda: generate(1)),
          "generate_tok_s_b8": no_grad(lambda: generate(8))}
  with no_grad:
    return runs, steps(*prefill(1))[0].tolist()


def _worker(engine: str, threads: str, folder: str, prompt_len: int, new_tokens: int, conn) -> None:
  """Serves timed runs of one engine in one thread setting: receives a metric name, sends seconds."""
  if engine == "pangu":
    os.environ["XLA_FLAGS"] = _XLA_THREADS[threads]  # before JAX starts in this process
    runs, greedy = _pangu_runs(folder, prompt_len, new_tokens)
  else:
    import torch
    torch.set_num_threads(1 if threads == "1" else os.cpu_count())
    runs, greedy = _transformers_runs(folder, prompt_len, new_tokens)
  for run in runs.values():
    run()  # warm-up: compilation, allocator, thread pools
  conn.send((sorted(runs), greedy))
  while (metric := conn.recv()) is not None:
    conn.send(runs[metric]())


def _tokens(metric: str, prompt_len: int, new_tokens: int) -> int:
  if metric == "prefill_tok_s":
    return PREFILL_CALLS * prompt_len
  batch = int(metric[-1])
  return batch * (new_tokens if metric.startswith("generate") else new_tokens - 1)


def measure(folder: str, prompt_len: int, new_tokens: int, repeats: int, with_torch: bool) -> dict:
  """{engine: {"tok_s": {metric: best rate}, "threads": {metric: setting}, "greedy": tokens}}."""
  engines = ["pangu"]
  skipped = None
  if with_torch:
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
      skipped = f"{' and '.join(missing)} not installed; pip install -e '.[bench]' to compare"
    else:
      engines.append("transformers")
  else:
    skipped = "--notorch"
  context = multiprocessing.get_context("spawn")
  workers = {}
  for engine in engines:
    for threads in ("1", "default"):
      parent, child = context.Pipe()
      process = context.Process(target=_worker, args=(engine, threads, folder, prompt_len, new_tokens, child))
      process.start()
      workers[engine, threads] = (process, parent, *parent.recv())
  seconds = {key: {m: [] for m in metrics} for key, (_, _, metrics, _) in workers.items()}
  for _ in range(repeats):
    for metric in (*KEYS, *EXTRA_TORCH_KEYS):
      for key, (_, conn, metrics, _) in workers.items():
        if metric in metrics:
          conn.send(metric)
          seconds[key][metric].append(conn.recv())
  for process, conn, _, _ in workers.values():
    conn.send(None)
    process.join()
  out = {}
  for engine in engines:
    rates = {threads: {m: _tokens(m, prompt_len, new_tokens) / statistics.median(s)
                       for m, s in seconds[engine, threads].items()} for threads in ("1", "default")}
    best = {m: max(rates, key=lambda t: rates[t][m]) for m in rates["1"]}
    out[engine] = {"tok_s": {m: rates[t][m] for m, t in best.items()}, "threads": best,
                   "by_threads": rates, "greedy": workers[engine, "1"][3]}
  if skipped:
    out["transformers"] = {"skipped": skipped}
  return out


def _context_cache(config, params, context: int, free: int):
  """A dense KVCache of batch 1 holding `context` tokens of random keys and values, with `free` more slots."""
  import jax.numpy as jnp
  import numpy as np

  from pangu import infer

  rng = np.random.default_rng(context)
  cache = infer.init_cache(config, jnp.zeros((1,), jnp.int32), context + free)
  kv = lambda: jnp.asarray(rng.normal(size=(1, context, config.n_kv_heads, config.head_dim)), config.dtype)
  layers = tuple(layer.write(kv(), kv(), jnp.arange(context, dtype=jnp.int32)[None]) for layer in cache.layers)
  return cache.replace(layers=layers, next_positions=cache.next_positions + context)


def specache_sweep(config, params, contexts: list[int], steps: int, rounds: int,
                   repeats: int) -> tuple[dict, str | None]:
  """({context: {"full_ms", "specache_ms", "ratio"}}, the memory kind SpeCache's full-precision store got): ms
  per generated token, interleaved (module docstring)."""
  import jax.numpy as jnp
  import numpy as np

  from pangu.infer import specache
  from pangu.infer.quantized_kv import QuantConfig

  settings = specache.SpeCacheConfig(QuantConfig(bits=1, group=32), residual=64, top_k=64)
  token = jnp.array([1], jnp.int32)
  free = steps * rounds * (repeats + 1) + 1
  out, memory_kind = {}, None
  for context in contexts:
    full = [_context_cache(config, params, context, free)]
    spec = specache.offload_host_store(specache.to_specache(_context_cache(config, params, context, free), settings))
    memory_kind = spec.layers[0].host_keys.sharding.memory_kind
    _, spec = specache.predecode(config, params, spec, token)
    spec = [spec]

    def full_call():
      tokens, full[0] = specache.cached_decode(config, params, full[0], token, steps)
      return tokens

    def spec_call():
      tokens, spec[0] = specache.specache_decode(config, params, spec[0], token, token, steps)
      return tokens

    times = {"full_ms": [], "specache_ms": []}
    for _ in range(rounds):
      times["full_ms"].append(common.median_ms(full_call, repeats) / steps)
      times["specache_ms"].append(common.median_ms(spec_call, repeats) / steps)
    row = {name: float(np.median(t)) for name, t in times.items()}
    row["ratio"] = row["specache_ms"] / row["full_ms"]
    out[str(context)] = row
    print(f"specache sweep: context {context}: {row}", flush=True)
  return out, memory_kind


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  from pangu import models
  from pangu.interop import hf

  prompt_len = common.pick(_PROMPT_LEN, 128, 64)
  new_tokens = common.pick(_NEW_TOKENS, 128, 16)
  repeats = common.pick(_REPEATS, 5, 3)
  config = models.small()
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as folder:
    hf.save_pretrained(config, models.init_params(config, jax.random.key(0)), folder)
    measured = measure(folder, prompt_len, new_tokens, repeats, _TORCH.value)

  ours, theirs = measured["pangu"], measured["transformers"]
  result = {"ours": ours["tok_s"], "transformers": theirs.get("tok_s", theirs),
            "threads": {"ours": ours["threads"], "transformers": theirs.get("threads")},
            "by_threads": {"ours": ours["by_threads"], "transformers": theirs.get("by_threads")},
            "shape": {"preset": "small", "params": models.param_count(config), "d_model": config.d_model,
                      "n_layers": config.n_layers, "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
                      "d_ff": config.d_ff, "vocab_size": config.vocab_size, "dtype": "float32",
                      "prompt_len": prompt_len, "new_tokens": new_tokens, "decode_batches": [1, 8],
                      "prefill_batch": 1, "repeats": repeats},
            "machine": {**common.machine_info(), "load_avg_1min_before": load_before,
                        "load_avg_1min_after": os.getloadavg()[0]}}
  rows = [{"metric": k, "pangu": ours["tok_s"][k]} for k in KEYS]
  if "skipped" in theirs:
    print(f"transformers part skipped: {theirs['skipped']}")
  else:
    result["speedup"] = {k: ours["tok_s"][k] / theirs["tok_s"][k] for k in KEYS}
    result["greedy_match"] = ours["greedy"] == theirs["greedy"]
    for row in rows:
      row.update(transformers=theirs["tok_s"][row["metric"]], speedup=result["speedup"][row["metric"]])
  table = common.format_table(rows, ["metric", "pangu", "transformers", "speedup"])
  if _SPECACHE.value:
    from pangu import infer
    steps, rounds = common.pick(_SPECACHE_STEPS, 16, 8), common.pick(_SPECACHE_ROUNDS, 5, 3)
    contexts = [int(c) for c in _SPECACHE_CONTEXTS.value]
    sweep_config, sweep_params = infer.decode_layout(config, models.init_params(config, jax.random.key(0)))
    result["specache"], memory_kind = specache_sweep(sweep_config, sweep_params, contexts, steps, rounds, repeats)
    result["specache_setup"] = {"bits": 1, "group": 32, "residual": 64, "top_k": 64, "host_store": memory_kind,
                                "prefetch": "async", "batch": 1, "steps_per_call": steps, "rounds": rounds,
                                "repeats": repeats, "rows_per_step": {"full": 1, "specache": 2},
                                "load_avg_1min_after": os.getloadavg()[0]}
    sweep_rows = [{"context": c, **r} for c, r in result["specache"].items()]
    table += "\n\nSpeCache vs full cache, ms per generated token (batch 1)\n\n" + common.format_table(
        sweep_rows, ["context", "full_ms", "specache_ms", "ratio"])
  common.write_json("bench_decode", result)
  common.write_table("bench_decode", table)

  _, axes = common.new_figure(ncols=2 if _SPECACHE.value else 1, size=(6.0, 3.5))
  ax = axes[0][0]
  positions = range(len(KEYS))
  ax.bar([p - 0.2 for p in positions], [ours["tok_s"][k] for k in KEYS], width=0.4, label="pangu (JAX)")
  if "skipped" not in theirs:
    ax.bar([p + 0.2 for p in positions], [theirs["tok_s"][k] for k in KEYS], width=0.4,
           label="transformers (PyTorch)")
  ax.set_xticks(list(positions), ["prefill b1", "decode b1", "decode b8"])
  ax.set_ylabel("tokens / s")
  ax.set_title(f"small preset, CPU, prompt {prompt_len}, {new_tokens} new tokens")
  ax.legend()
  if _SPECACHE.value:
    sweep = axes[0][1]
    contexts = [int(c) for c in result["specache"]]
    sweep.plot(contexts, [r["ratio"] for r in result["specache"].values()], "o-", label="SpeCache / full")
    sweep.axhline(1.3, color="gray", linestyle="--", label="goal 1.3x")
    sweep.set_xscale("log", base=2)
    sweep.set_xlabel("context tokens")
    sweep.set_ylabel("decode time per token, ratio")
    sweep.set_title("SpeCache 1-bit vs full cache, CPU, batch 1")
    sweep.legend()
  common.save_figure(ax.figure, "bench_decode")


if __name__ == "__main__":
  app.run(main)
