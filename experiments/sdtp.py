"""SDTP vs random, attention-score and no pruning on a small byte-level LM with a key-value retrieval task.

  python -m experiments.sdtp --quick

Spec shared/specs/sdtp.md section 4 (SDTP, arXiv 2504.04514), issue 15. A 12-layer narrow decoder is trained on
the embedded corpus mixed with a retrieval task: a few records "@ab:47;" are buried at random depths of a corpus
window and the prompt ends with the question "?ab:", whose answer "47" depends on one record only (the answer
bytes weigh ANSWER_WEIGHT times a corpus byte in the LM loss so that the small model learns the task). The LM is
cached under <results_dir>/sdtp_base, so re-runs do not retrain. SDTP's predictors are then trained on the frozen
LM (pangu.infer.sdtp: saliency targets, Gumbel masks, MSE + ranking + LM loss) with the paper's schedule scaled to
the depth (10 stages x 0.9 from layer 2, about 65 % of the prompt pruned). Every method keeps the same number of
tokens at the same layers, with the same 4 sinks and recent 10 %; only the ranking differs:
  * sdtp: the predictors; random: uniform scores; attention: the last token's attention at the pruning layer
    (training-free, H2O-like); none: no pruning.
For each: retrieval accuracy (both answer bytes right, teacher forced) and continuation perplexity per byte of
corpus text, both through the real path (a pruned prefill into the KV cache, then the continuation extends the
cache), analytic prefill FLOPs, and prefill wall time relative to the unpruned prefill, measured side by side in
one run. Then the SDTP / unpruned prefill speed-up at growing prompt lengths (the trained LM, batch 1).

Writes <results_dir>/sdtp.json: {"keep_ratio", "methods": {name: {"accuracy", "ppl", "prefill_flops",
"prefill_time_ratio"}}, "flops_reduction", "prefill_speedup", "speedup_by_length": [{"length", "none_ms", "sdtp_ms",
"speedup", "flops_reduction"}], "claims"}, sdtp.png (speed-up vs prompt length,
accuracy per method) and sdtp.md (the table, setup and speed-up per length).
"""

import dataclasses
import json
import math
import os
import time

# One CPU device: prefill is timed on one device; eight fake devices on a few cores only add overhead.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

from absl import app, flags  # noqa: E402

from experiments import common  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", None, "LM training steps.", lower_bound=1)
_PREDICTOR_STEPS = flags.DEFINE_integer("predictor_steps", None, "Predictor training steps.", lower_bound=1)
_PROMPT = flags.DEFINE_integer("prompt_len", None, "Prompt length N of training and evaluation.", lower_bound=64)
_WIDTH = flags.DEFINE_integer("width", None, "Model width D.", lower_bound=8)
_LAYERS = flags.DEFINE_integer("layers", None, "Decoder layers (>= 12 for the paper's 10 stages).", lower_bound=2)
_EVAL = flags.DEFINE_integer("eval_examples", None, "Evaluation prompts per metric.", lower_bound=1)
_LENGTHS = flags.DEFINE_list("speed_lengths", None, "Prompt lengths of the speed-up curve.")
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed prefills per measurement (median).", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", None, "Sequences per training step and evaluation batch.", lower_bound=2)

FULL = dict(steps=3000, predictor_steps=400, prompt_len=512, width=128, layers=12, eval_examples=256,
            speed_lengths=["512", "1024", "2048", "4096"], repeats=5, batch=16)
QUICK = dict(steps=40, predictor_steps=10, prompt_len=128, width=64, layers=12, eval_examples=16,
             speed_lengths=["512", "2048"], repeats=2, batch=8)
SEED, N_RECORDS, CONTINUATION, ANSWER_WEIGHT = 0, 4, 32, 16.0
METHODS = ("none", "sdtp", "random", "attention")
LETTERS, DIGITS = b"abcdefghijklmnopqrstuvwxyz", b"0123456789"
PAPER = {"flops_reduction": (0.33, 0.47), "prefill_speedup": 1.52, "accuracy_points": 1.0}
SPEEDUP_GOAL, GOAL_LENGTH = 1.5, 2048


# --- data -------------------------------------------------------------------------------------------------------

def corpus_bytes(split: str, quick: bool):
  import numpy as np

  from pangu import data
  documents = data.load_documents(data.CorpusConfig(max_files=200 if quick else None), split)
  return np.frombuffer("\n".join(documents).encode("utf-8"), np.uint8).astype(np.int32)


def retrieval_example(rng, text, prompt_len: int):
  """(prompt [N], answer [2]): corpus text with N_RECORDS records "@ab:47;" at random depths, then "?ab:"."""
  import numpy as np
  keys = set()
  while len(keys) < N_RECORDS:
    keys.add(bytes(int(c) for c in rng.choice(list(LETTERS), 2)))
  keys = sorted(keys)
  values = [bytes(int(c) for c in rng.choice(list(DIGITS), 2)) for _ in keys]
  asked = int(rng.integers(N_RECORDS))
  question = b"?" + keys[asked] + b":"
  records = [b"@" + k + b":" + v + b";" for k, v in zip(keys, values)]
  filler = prompt_len - len(question) - sum(len(r) for r in records)
  start = int(rng.integers(0, len(text) - filler))
  window = list(text[start:start + filler])
  for depth, record in sorted(zip(rng.integers(0, filler, N_RECORDS), records), reverse=True):
    window[depth:depth] = list(record)
  prompt = np.array(window + list(question), np.int32)
  return prompt, np.array(list(values[asked]), np.int32)


def corpus_example(rng, text, prompt_len: int):
  """(prompt [N], continuation [CONTINUATION]) from one corpus window."""
  start = int(rng.integers(0, len(text) - prompt_len - CONTINUATION))
  window = text[start:start + prompt_len + CONTINUATION]
  return window[:prompt_len], window[prompt_len:]


def lm_batch(rng, text, prompt_len: int, batch: int) -> dict:
  """Half retrieval prompts followed by the answer, ";" and corpus text (the answer bytes weighted
  ANSWER_WEIGHT), half plain corpus windows; the loss is over every byte."""
  import numpy as np
  rows, weights = [], []
  for i in range(batch):
    if i % 2 == 0:
      prompt, answer = retrieval_example(rng, text, prompt_len)
      suffix = np.concatenate([answer, [ord(";")], corpus_example(rng, text, 0)[1][:CONTINUATION - 3]])
      weight = np.ones(prompt_len + CONTINUATION)
      weight[prompt_len - 1:prompt_len + 1] = ANSWER_WEIGHT  # the two answer bytes as targets
    else:
      prompt, suffix = corpus_example(rng, text, prompt_len)
      weight = np.ones(prompt_len + CONTINUATION)
    rows.append(np.concatenate([prompt, suffix]))
    weights.append(weight)
  tokens = np.stack(rows).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.stack(weights)[:, :-1].astype(np.float32)}


def suffix_batch(batch: dict, prompt_len: int) -> dict:
  """The same batch with the loss on the suffix only (predictor training: the prompt is what gets pruned)."""
  import numpy as np
  mask = np.zeros_like(batch["mask"])
  mask[:, prompt_len - 1:] = 1.0
  return {**batch, "mask": mask}


# --- the base LM ------------------------------------------------------------------------------------------------

def base_config(setup: dict):
  from pangu import models
  return models.TransformerConfig(vocab_size=384, d_model=setup["width"], n_layers=setup["layers"],
                                  n_heads=max(1, setup["width"] // 32), n_kv_heads=max(1, setup["width"] // 32),
                                  d_ff=3 * setup["width"], init="small",
                                  max_position_embeddings=max(8192, setup["prompt_len"] + CONTINUATION))


def train_base(setup: dict, text, results_dir: str) -> tuple:
  """(config, params, record): trained, or loaded from <results_dir>/sdtp_base when it holds this very run."""
  import flax.serialization
  import jax
  import numpy as np

  from pangu import models
  from pangu.parallel import single_device_mesh
  from pangu.train.config import TrainConfig
  from pangu.train.step import init_train_state, make_train_step

  config = base_config(setup)
  steps = setup["steps"]
  train_config = TrainConfig(peak_lr=3e-3, end_lr=3e-4, warmup_steps=max(steps // 20, 10), total_steps=steps,
                             weight_decay=0.01)
  signature = json.loads(json.dumps({"model": config.to_dict(), "train": dataclasses.asdict(train_config),
                                     "seed": SEED, "batch": setup["batch"], "prompt_len": setup["prompt_len"],
                                     "answer_weight": ANSWER_WEIGHT, "records": N_RECORDS}))
  folder = os.path.join(results_dir, "sdtp_base")
  template = jax.device_get(models.init_params(config, jax.random.key(SEED)))
  try:
    with open(os.path.join(folder, "record.json")) as f:
      record = json.load(f)
    if record["signature"] == signature:
      with open(os.path.join(folder, "params.msgpack"), "rb") as f:
        return config, flax.serialization.from_bytes(template, f.read()), {**record, "cached": True}
  except (OSError, ValueError, KeyError):
    pass
  mesh = single_device_mesh()  # the report runs every experiment with 8 host devices configured
  state = init_train_state(config, train_config, jax.random.key(SEED), mesh)
  step = make_train_step(config, train_config, mesh)
  rng, start, losses = np.random.default_rng(SEED), time.perf_counter(), []
  for i in range(steps):
    state, metrics = step(state, lm_batch(rng, text, setup["prompt_len"], setup["batch"]))
    if (i + 1) % max(1, steps // 10) == 0:
      losses.append({"step": i + 1, "loss": float(metrics["loss"])})
      print(f"base LM: step {i + 1} loss {losses[-1]['loss']:.3f}", flush=True)
  params = jax.device_get(state.params)
  record = {"signature": signature, "loss_curve": losses, "train_seconds": time.perf_counter() - start}
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "params.msgpack"), "wb") as f:
    f.write(flax.serialization.to_bytes(params))
  with open(os.path.join(folder, "record.json"), "w") as f:
    json.dump(record, f)
  return config, params, {**record, "cached": False}


def train_predictors(config, params, schedule, setup: dict, text) -> tuple:
  import jax
  import numpy as np
  import optax

  from pangu.infer import sdtp
  optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, setup["predictor_steps"]))
  predictors = sdtp.init_predictors(schedule, config.d_model, jax.random.key(SEED + 1))
  opt_state = optimizer.init(predictors)
  step = sdtp.make_predictor_train_step(config, schedule, setup["prompt_len"], optimizer)
  rng, start, curve = np.random.default_rng(SEED + 1), time.perf_counter(), []
  for i in range(setup["predictor_steps"]):
    batch = suffix_batch(lm_batch(rng, text, setup["prompt_len"], setup["batch"] // 2), setup["prompt_len"])
    predictors, opt_state, metrics = step(predictors, opt_state, params, batch, jax.random.key(i))
    if (i + 1) % max(1, setup["predictor_steps"] // 5) == 0:
      curve.append({k: float(metrics[k]) for k in ("loss", "cls", "mse", "rank")})
      print(f"predictors: step {i + 1} " + " ".join(f"{k} {v:.3f}" for k, v in curve[-1].items()), flush=True)
  return predictors, {"curve": curve, "seconds": time.perf_counter() - start}


# --- evaluation -------------------------------------------------------------------------------------------------

def method_stages(config, schedule, params, predictors, method: str, prompt_len: int):
  """(stages, stage_params) of a method's prefill; (None, None) without pruning."""
  import jax

  from pangu.infer import sdtp
  if method == "none":
    return None, None
  stage_params = {"sdtp": predictors, "random": jax.random.key(SEED + 2),
                  "attention": sdtp.attention_scorer_params(config, schedule, params)}[method]
  return sdtp.pruning_stages(config, schedule, prompt_len, method), stage_params


def continuation_logits(config, params, prompts, continuations, stages, stage_params):
  """Logits [B, C, V] predicting each continuation token: a (pruned) prefill of the prompts into the KV cache,
  then the continuation (but its last token) extending it."""
  import jax.numpy as jnp

  from pangu import infer
  batch, prompt_len = prompts.shape
  # One cache size for every continuation length, so each method's prefill compiles once.
  cache = infer.init_cache(config, jnp.zeros((batch,), jnp.int32), prompt_len + CONTINUATION)
  first, cache = infer.extend(config, params, prompts, cache, last_only=True, stages=stages,
                              stage_params=stage_params)
  rest, _ = infer.extend(config, params, continuations[:, :-1], cache)
  return jnp.concatenate([first, rest], axis=1)


def evaluate(config, params, schedule, predictors, setup: dict, text) -> dict:
  """method -> accuracy, ppl (per byte), the same prompts for every method."""
  import numpy as np

  rng, n, prompt_len = np.random.default_rng(SEED + 3), setup["eval_examples"], setup["prompt_len"]
  batch = setup["batch"]
  retrieval = [retrieval_example(rng, text, prompt_len) for _ in range(n)]
  corpus = [corpus_example(rng, text, prompt_len) for _ in range(n)]
  results = {}
  for method in METHODS:
    stages, stage_params = method_stages(config, schedule, params, predictors, method, prompt_len)
    correct, nll, count = 0, 0.0, 0
    for chunk in range(0, n, batch):
      prompts = np.stack([p for p, _ in retrieval[chunk:chunk + batch]])
      answers = np.stack([a for _, a in retrieval[chunk:chunk + batch]])
      logits = continuation_logits(config, params, prompts, answers, stages, stage_params)
      correct += int(np.sum(np.all(np.argmax(logits, -1) == answers, axis=1)))
      prompts = np.stack([p for p, _ in corpus[chunk:chunk + batch]])
      follow = np.stack([c for _, c in corpus[chunk:chunk + batch]])
      logits = np.asarray(continuation_logits(config, params, prompts, follow, stages, stage_params), np.float64)
      log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
      nll += float(np.sum(log_z - np.take_along_axis(logits, follow[..., None], -1)[..., 0]))
      count += follow.size
    results[method] = {"accuracy": correct / n, "ppl": math.exp(nll / count)}
    print(f"{method}: accuracy {results[method]['accuracy']:.3f} ppl {results[method]['ppl']:.3f}", flush=True)
  return results


def prefill_ms(config, params, schedule, predictors, methods, prompts, repeats: int) -> dict:
  """method -> median prefill ms (into a cache of N + CONTINUATION slots, as in `evaluate`); every method compiled
  first, then timed in turn, round after round."""
  import jax
  import jax.numpy as jnp

  from pangu import infer
  batch, prompt_len = prompts.shape
  calls = {}
  for method in methods:
    stages, stage_params = method_stages(config, schedule, params, predictors, method, prompt_len)
    cache = infer.init_cache(config, jnp.zeros((batch,), jnp.int32), prompt_len + CONTINUATION)
    calls[method] = (lambda s=stages, p=stage_params, c=cache:
                     infer.extend(config, params, prompts, c, last_only=True, stages=s, stage_params=p))
  for call in calls.values():
    jax.block_until_ready(call())
  times = {method: [] for method in methods}
  for _ in range(repeats):
    for method, call in calls.items():
      times[method].append(common.median_ms(call, 1))
  return {method: sorted(t)[len(t) // 2] for method, t in times.items()}


# --- report -----------------------------------------------------------------------------------------------------

def claims(payload: dict) -> list[dict]:
  """Verdicts from the JSON alone."""
  methods = payload["methods"]
  full, ours = methods["none"]["accuracy"], methods["sdtp"]["accuracy"]
  baselines = max(methods["random"]["accuracy"], methods["attention"]["accuracy"])
  learned = full >= 0.5  # below this the base LM has not learned the task and accuracy says little
  pruned = 1 - payload["keep_ratio"]
  reduction, speedup = payload["flops_reduction"], payload["prefill_speedup"]
  rows = [
      common.claim("SDTP", "~65 % of tokens pruned cut prefill FLOPs by 33-47 %",
                   "Mistral-7B: 33 % (4K) to 47 % (128K) end to end",
                   f"{pruned:.0%} of prompt tokens pruned: prefill FLOPs -{reduction:.1%}",
                   "reproduced" if reduction >= PAPER["flops_reduction"][0] else
                   "partly" if reduction >= 0.2 else "not reproduced"),
      common.claim("SDTP", "Pruned prefill is really faster", f"1.52x at 4K, 2.15x at 128K; goal >= "
                   f"{SPEEDUP_GOAL}x at >= {GOAL_LENGTH}", f"{speedup:.2f}x at the longest measured prompt",
                   "reproduced" if speedup >= SPEEDUP_GOAL else "partly" if speedup > 1.1 else "not reproduced"),
      common.claim("SDTP", "Accuracy about unchanged at ~65 % pruned", "within 1 point (Mistral-7B avg 71.39 -> "
                   "71.24)", f"retrieval accuracy {full:.1%} -> {ours:.1%}" +
                   ("" if learned else " (the base LM did not learn the task: no test)"),
                   "not reproduced" if not learned else "reproduced" if abs(full - ours) <= 0.01 else
                   "partly" if full - ours <= 0.05 else "contradicted" if full - ours > 0.10 else "not reproduced"),
      common.claim("SDTP", "Saliency-driven selection beats random and attention-score pruning at the same ratio",
                   "spec 4 prediction", f"SDTP {ours:.1%} vs best baseline {baselines:.1%}",
                   "not reproduced" if not learned else "reproduced" if ours > baselines else
                   "partly" if ours == baselines else "contradicted"),
  ]
  return rows


def plot(speed: list, results: dict) -> None:
  fig, axes = common.new_figure(ncols=2, size=(5.0, 3.6))
  axes[0, 0].plot([r["length"] for r in speed], [r["speedup"] for r in speed], marker="o", label="measured")
  axes[0, 0].axhline(SPEEDUP_GOAL, color="gray", ls=":", lw=1, label=f"goal {SPEEDUP_GOAL}x")
  axes[0, 0].set(xlabel="prompt length", ylabel="prefill speed-up (none / SDTP)", xscale="log",
                 title="SDTP prefill speed-up, batch 1")
  axes[0, 0].legend(fontsize=7)
  names = list(results)
  axes[0, 1].bar(names, [results[m]["accuracy"] for m in names])
  axes[0, 1].set(ylabel="retrieval accuracy", title="same keep ratio for every method")
  common.save_figure(fig, "sdtp")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import numpy as np

  from pangu.infer import sdtp

  quick = common.QUICK.value
  defaults = QUICK if quick else FULL
  setup = {k: (flag.value if flag.value is not None else defaults[k]) for k, flag in (
      ("steps", _STEPS), ("predictor_steps", _PREDICTOR_STEPS), ("prompt_len", _PROMPT), ("width", _WIDTH),
      ("layers", _LAYERS), ("eval_examples", _EVAL), ("speed_lengths", _LENGTHS), ("repeats", _REPEATS),
      ("batch", _BATCH))}
  lengths = [int(x) for x in setup["speed_lengths"]]
  results_dir = common.RESULTS_DIR.value
  start = time.perf_counter()
  text = corpus_bytes("train", quick)
  config, params, training = train_base(setup, text, results_dir)
  schedule = sdtp.SDTPConfig.scaled_to_depth(config.n_layers)
  schedule.check(config.n_layers, min([setup["prompt_len"], *lengths]))
  predictors, predictor_record = train_predictors(config, params, schedule, setup, text)
  val_text = corpus_bytes("validation", quick)
  results = evaluate(config, params, schedule, predictors, setup, val_text)

  prompt = retrieval_example(np.random.default_rng(SEED + 4), val_text, setup["prompt_len"])[0]
  prompts = np.stack([prompt] * setup["batch"])
  times = prefill_ms(config, params, schedule, predictors, METHODS, prompts, setup["repeats"])
  n = setup["prompt_len"]
  for method in METHODS:
    results[method]["prefill_flops"] = sdtp.prefill_flops(config, None if method == "none" else schedule, n)
    results[method]["prefill_time_ratio"] = times[method] / times["none"]
  speed = []
  for length in lengths:
    tokens = np.random.default_rng(length).integers(0, 256, (1, length)).astype(np.int32)
    ms = prefill_ms(config, params, schedule, predictors, ("none", "sdtp"), tokens, setup["repeats"])
    speed.append({"length": length, "none_ms": ms["none"], "sdtp_ms": ms["sdtp"], "speedup": ms["none"] / ms["sdtp"],
                  "flops_reduction": 1 - sdtp.prefill_flops(config, schedule, length)
                  / sdtp.prefill_flops(config, None, length)})
    print(f"length {length}: {speed[-1]}", flush=True)

  keep_ratio = sdtp.tokens_per_layer(config, schedule, n)[-1] / n
  payload = {"keep_ratio": keep_ratio, "methods": results,
             "flops_reduction": 1 - results["sdtp"]["prefill_flops"] / results["none"]["prefill_flops"],
             "prefill_speedup": speed[-1]["speedup"], "speedup_by_length": speed}
  payload["claims"] = claims(payload)
  common.write_json("sdtp", payload, results_dir)
  plot(speed, results)
  rows = [{"method": m, **results[m]} for m in METHODS]
  table = common.format_table(rows, ["method", "accuracy", "ppl", "prefill_flops", "prefill_time_ratio"])
  table += "\n\n" + common.format_table(speed, ["length", "none_ms", "sdtp_ms", "speedup", "flops_reduction"])
  table += (f"\n\nSetup: {'quick' if quick else 'full'}; {config.n_layers} layers, D={config.d_model}; pruning layers "
            f"{schedule.layers}, keep {schedule.keep_ratio} per stage ({keep_ratio:.1%} of the prompt left); prompt "
            f"{n} bytes; LM {setup['steps']} steps ({'cached' if training['cached'] else 'trained'}), predictors "
            f"{setup['predictor_steps']} steps; {setup['eval_examples']} evaluation prompts; "
            f"machine {common.machine_info()}; {time.perf_counter() - start:.0f} s.")
  common.write_table("sdtp", table, results_dir)
  del predictor_record


if __name__ == "__main__":
  app.run(main)
