"""SlimLLM vs structured-pruning baselines on a small byte-level LM: perplexity, parameters and prefill time.

  python -m experiments.pruning --quick

Spec shared/specs/slimllm.md section 4 (SlimLLM, arXiv 2505.22689). A decoder LM is trained on the embedded corpus
(byte tokens, context 128) until its validation loss flattens, or loaded from its checkpoint under
<results_dir>/pruning_base (cached with the validation curve, so the report does not retrain). It is then pruned
with every method of pangu.compress.prune at 20 % and 50 % of its non-embedding parameters, calibrated on 32 x 128
tokens of the training split, with SlimLLM's per-layer ratios for every method (only the criterion differs) and no
tuning afterwards. For each pruned model: validation perplexity (per byte), parameters, calibration time, and the
prefill speed-up, all models' forward passes over the same [8, 128] batch interleaved in one run and the best of
several taken. Calibration time is also measured on the `small` preset (random weights; --timing_preset; full mode).

The paper's claim under test: SlimLLM has the lowest perplexity among the training-free methods at both ratios
(LLaMA-7B, WikiText2, no tuning: 15.95 at 20 %, 37.89 at 50 %). The paper's baselines were LLM-Pruner, LoRAPrune
and LoRAP; ours are stand-ins (magnitude, Wanda-sp, FLAP, LLM-Pruner's Taylor score, ShortGPT layer removal).

Writes <results_dir>/pruning.json: {"base": {"params", "ppl"}, "methods": {name: {"20": {"params", "ppl",
"prefill_speedup", ...}, "50": {...}}}, "claim", "verdict", "goals", "training", "setup"}, pruning.png (perplexity
vs parameters per method; prefill speed-up) and pruning.md.
"""

import math

from experiments import xla_host

# One CPU device: prefill is timed on one device, and on a few cores the eight fake devices the other experiments
# use only add overhead (an explicit XLA_FLAGS still wins).
xla_host.use_cpu_devices(1)

from absl import app, flags  # noqa: E402

from experiments import common, small_lm  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", None, "Most training steps of the base model.", lower_bound=2)
_EVAL_EVERY = flags.DEFINE_integer("eval_every", None, "Steps between validation checks of the base model.",
                                   lower_bound=1)
_WIDTH = flags.DEFINE_integer("width", None, "Model width D.", lower_bound=8)
_LAYERS = flags.DEFINE_integer("layers", None, "Decoder layers.", lower_bound=2)
_HEADS = flags.DEFINE_integer("heads", None, "Attention heads (MHA, as the paper's LLaMA).", lower_bound=1)
_D_FF = flags.DEFINE_integer("d_ff", None, "SwiGLU width F.", lower_bound=1)
_METHODS = flags.DEFINE_list("methods", None, "Pruning methods (default: all of pangu.compress.prune.METHODS).")
_RATIOS = flags.DEFINE_list("ratios", ["20", "50"], "Percent of non-embedding parameters to remove.")
_CALIBRATION = flags.DEFINE_integer("calibration", 32, "Calibration sequences (the paper: 32).", lower_bound=1)
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None, "Validation batches of 16 x 128 tokens.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed prefill rounds (best of).", lower_bound=1)
_ABLATIONS = flags.DEFINE_bool("ablations", None, "Also run SlimLLM's ablations (spec section 4; default: in full "
                                "mode, at every ratio; an explicit --ablations with --quick: at the largest ratio).")
_TIMING_PRESET = flags.DEFINE_string("timing_preset", None, "Also time calibration on this preset of pangu.models "
                                     "(random weights, vocab 384; default: small in full mode, skipped with --quick, "
                                     "which times its own base model); empty: skip.")
_TIMING_METHODS = flags.DEFINE_list("timing_methods", None, "Methods timed on --timing_preset (default every method; "
                                    "--quick: slimllm, the slowest).")

FULL = dict(small_lm.BASE_FULL, eval_batches=32, repeats=20)
QUICK = dict(small_lm.BASE_QUICK, eval_batches=8, repeats=8)
SEQ_LEN, BATCH, PREFILL_BATCH, SEED = small_lm.SEQ_LEN, small_lm.BATCH, 8, small_lm.SEED
CLOSE = 0.05  # within this relative perplexity a ranking is not evidence against the claim
CLAIM = ("SlimLLM has the lowest perplexity among training-free structured pruning methods at both 20 % and 50 % "
         "of the parameters removed (LLaMA-7B, WikiText2, no tuning: 15.95 at 20 %, 37.89 at 50 %; dense 12.62).")
PAPER = {"dense": 12.62, "slimllm": {"20": 15.95, "50": 37.89},
         "llm_pruner": {"20": 19.09, "50": 112.44}, "lorap": {"20": 15.69, "50": 56.96}}
PREFILL_GOAL = 1.6  # prefill speed-up at 50 %
# SlimLLM with one component changed (spec section 4: the paper's ablations and the authors' code flags).
ABLATIONS = {"no_greedy": dict(greedy_search=False), "plain_ffn": dict(ffn_importance="plain"),
             "uniform": dict(uniform=True), "recovery_none": dict(recovery="none"),
             "recovery_lstsq": dict(recovery="lstsq"),
             "flattened_pearson": dict(head_corr="flattened"), "exempt_1pct": dict(ffn_exempt_lowest_frac=0.01)}


def time_preset(preset: str, methods: list, tokens) -> dict:
  """Calibration seconds of each method at 50 % on `preset` (random weights): the cost at a larger shape."""
  import jax

  from pangu import models
  from pangu.compress.prune import prune
  config = models.get_preset(preset, vocab_size=384)
  params = models.init_params(config, jax.random.key(0))
  out = {}
  for method in methods:
    out[method] = prune(config, params, tokens, method=method, ratio=0.5)[2].seconds
    print(f"{preset}: {method} calibration {out[method]:.1f} s", flush=True)
  return {"preset": preset, "params": models.param_count(config), "seconds": out}


def verdict(results: dict, ratios: list) -> tuple[str, str]:
  """reproduced: SlimLLM's perplexity is the lowest at every ratio; partly: at some; contradicted: at none, and at
  every ratio some baseline is more than CLOSE lower; not reproduced: otherwise (it loses, but narrowly)."""
  wins, beaten, details = [], 0, []
  for r in ratios:
    slim = results["slimllm"][r]["ppl"]
    best_name, best = min(((m, v[r]["ppl"]) for m, v in results.items() if m != "slimllm"), key=lambda t: t[1])
    details.append(f"{r} %: SlimLLM {slim:.4g}, best baseline {best_name} {best:.4g} (SlimLLM {slim / best - 1:+.1%})")
    if slim <= best:
      wins.append(r)
    elif best < (1 - CLOSE) * slim:
      beaten += 1
  if len(wins) == len(ratios):
    status, rule = "reproduced", "lowest at every ratio"
  elif wins:
    status, rule = "partly", f"lowest at {', '.join(wins)} % only"
  elif beaten == len(ratios):
    status, rule = "contradicted", f"a baseline is more than {CLOSE:.0%} lower at every ratio"
  else:
    status, rule = "not reproduced", f"lowest at no ratio, but not beaten by more than {CLOSE:.0%} at every ratio"
  return status, f"{rule}: " + "; ".join(details)


def claims(payload: dict) -> list[dict]:
  """The report's rows: the perplexity claim (its verdict from `verdict`) and the prefill goal at 50 %."""
  slim = payload["methods"]["slimllm"]
  rows = [common.claim("SlimLLM", "Lowest perplexity among training-free structured pruning methods at 20 % and 50 %",
                       f"LLaMA-7B WikiText2 {PAPER['slimllm']['20']} / {PAPER['slimllm']['50']}",
                       payload["verdict"]["reason"], payload["verdict"]["status"])]
  if "50" in slim:
    speedup = slim["50"]["prefill_speedup"]
    rows.append(common.claim("SlimLLM", "Pruning 50 % really speeds up prefill", f"goal >= {PREFILL_GOAL}x",
                             f"{speedup:.2f}x (SlimLLM at 50 %, side by side with the unpruned model)",
                             "reproduced" if speedup >= PREFILL_GOAL else "partly" if speedup > 1 else
                             "not reproduced"))
  return rows


def plot(base: dict, results: dict, ratios: list) -> None:
  fig, axes = common.new_figure(ncols=2, size=(5.5, 4))
  for name, per_ratio in results.items():
    xs = [base["params"] / 1e6] + [per_ratio[r]["params"] / 1e6 for r in ratios]
    ys = [base["ppl"]] + [per_ratio[r]["ppl"] for r in ratios]
    axes[0, 0].plot(xs, ys, marker="o", lw=1, label=name)
    axes[0, 1].plot([0] + [per_ratio[r]["achieved_ratio"] * 100 for r in ratios],
                    [1] + [per_ratio[r]["prefill_speedup"] for r in ratios], marker="o", lw=1, label=name)
  axes[0, 0].set(xlabel="parameters (M)", ylabel="validation perplexity (per byte)", yscale="log",
                 title="no tuning after pruning")
  axes[0, 1].axhline(PREFILL_GOAL, color="gray", ls=":", lw=1)
  axes[0, 1].set(xlabel="non-embedding parameters removed (%)", ylabel="prefill speed-up vs unpruned",
                 title="prefill [8 x 128], best of rounds")
  axes[0, 0].legend(fontsize=7)
  common.save_figure(fig, "pruning")


def report_table(payload: dict) -> str:
  """pruning.md from the JSON alone: the setup, one row per method, the claim and its verdict, goals, ablations."""
  setup, base, training, results = payload["setup"], payload["base"], payload["training"], payload["methods"]
  ratios, goals = setup["ratios"], payload["goals"]
  rows = [{"method": "unpruned", **{f"ppl_{r}": base["ppl"] for r in ratios}, **{f"params_{r}": base["params"]
                                                                                   for r in ratios}}]
  for method, per_ratio in results.items():
    row = {"method": method}
    for r, v in per_ratio.items():
      row.update({f"ppl_{r}": v["ppl"], f"params_{r}": v["params"], f"removed_{r}": v["achieved_ratio"],
                  f"prefill_x_{r}": v["prefill_speedup"], f"flops_x_{r}": v["flops_speedup"],
                  f"calib_s_{r}": v["calibration_seconds"]})
    rows.append(row)
  columns = ["method"] + [f"{c}_{r}" for r in ratios
                          for c in ("ppl", "params", "removed", "prefill_x", "flops_x", "calib_s")]
  flat = "flattened" if training["flattened"] else "not yet flat"
  improvement = training["last_interval_relative_improvement"]
  parts = [
      f"Base: D={setup['width']}, L={setup['layers']}, {setup['heads']} heads (MHA), F={setup['d_ff']}, "
      f"{base['params']} parameters, trained {training['final_step']} steps (validation loss {flat}: the last "
      f"{setup['eval_every']} steps improved it by {improvement:.1%}), validation perplexity {base['ppl']:.3f} per "
      f"byte. Pruned with {setup['calibration'][0]} x {setup['calibration'][1]} calibration tokens, no tuning; "
      f"prefill speed-up over the unpruned model on {setup['prefill_batch']}, best of {setup['repeats']} "
      "interleaved rounds (flops_x: the ratio of matmul FLOPs per token, pangu.models.forward_matmul_flops_per_token).",
      common.format_table(rows, columns),
      f"Claim: {payload['claim']}",
      f"Verdict: **{payload['verdict']['status']}** ({payload['verdict']['reason']}).",
      f"Prefill speed-up at 50 % (goal >= {goals['prefill_speedup_goal']}): " + ", ".join(
          f"{m} {v:.2f}x" for m, v in goals["prefill_speedup_50"].items()),
      f"Slowest calibration on {goals['calibration_timed_on']}: {goals['calibration_slowest']} "
      f"{goals['calibration_seconds_max']:.1f} s (goal < {goals['calibration_seconds_goal']} s on the small preset)."]
  ablations = payload["ablations"]
  if ablations:
    shown = list(next(iter(ablations.values())))
    full = ", ".join(f"{results['slimllm'][r]['ppl']:.4g} at {r} %" for r in shown)
    parts += [f"SlimLLM ablations, validation perplexity (full SlimLLM: {full}):",
              common.format_table([{"ablation": name, **{f"ppl_{r}": v[r]["ppl"] for r in shown}}
                                   for name, v in ablations.items()], ["ablation"] + [f"ppl_{r}" for r in shown])]
  timing = payload.get("calibration_timing")
  if timing:
    parts.append(f"Calibration time on the {timing['preset']} preset ({timing['params']} parameters, random weights, "
                 "50 %): " + ", ".join(f"{m} {t:.0f} s" for m, t in timing["seconds"].items()))
  return "\n\n".join(parts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  from pangu import models
  from pangu.compress.prune import METHODS, prune

  defaults = QUICK if common.QUICK.value else FULL
  setup = {k: (flag.value if flag.value is not None else defaults[k]) for k, flag in (
      ("steps", _STEPS), ("eval_every", _EVAL_EVERY), ("width", _WIDTH), ("layers", _LAYERS), ("heads", _HEADS),
      ("d_ff", _D_FF), ("eval_batches", _EVAL_BATCHES), ("repeats", _REPEATS))}
  methods = _METHODS.value or list(METHODS)
  unknown = set(methods) - set(METHODS)
  if unknown or "slimllm" not in methods:
    raise app.UsageError(f"--methods must include slimllm and come from {METHODS}; unknown: {sorted(unknown)}")
  timed_methods = common.pick(_TIMING_METHODS, methods, ["slimllm"])
  if set(timed_methods) - set(METHODS):
    raise app.UsageError(f"--timing_methods: unknown {sorted(set(timed_methods) - set(METHODS))}; known {METHODS}")
  ratios = [str(int(r)) for r in _RATIOS.value]
  results_dir = common.RESULTS_DIR.value

  train_data, val_batches = small_lm.load_data(common.QUICK.value, setup["eval_batches"])
  config, params, training = small_lm.train_base(setup, results_dir, train_data, val_batches)
  calibration = small_lm.calibration_rows(train_data, _CALIBRATION.value)
  prefill_tokens = val_batches[0]["inputs"][:PREFILL_BATCH]

  base = {"params": models.param_count(config), "ppl": math.exp(small_lm.validation_loss(config, params, val_batches))}
  print(f"base: {base['params']} params, ppl {base['ppl']:.3f} (step {training['final_step']})", flush=True)
  def run(name: str, method: str, r: str, **options) -> tuple:
    pruned_config, pruned, report = prune(config, params, calibration, method=method, ratio=int(r) / 100, **options)
    result = {
        "params": report.params_after, "ppl": math.exp(small_lm.validation_loss(pruned_config, pruned, val_batches)),
        "non_embedding_params": report.non_embedding_after, "achieved_ratio": report.achieved_ratio,
        "calibration_seconds": report.seconds,
        "layer_shapes": [list(map(int, (s.n_heads, s.n_kv_heads, s.d_ff)))
                         for s in (pruned_config.layer(i) for i in range(pruned_config.n_layers))],
        "layer_ratios": [layer.ratio for layer in report.layers]}
    print(f"{name} {r} %: ppl {result['ppl']:.3f}, params {report.params_after}, removed {report.achieved_ratio:.3f}, "
          f"calibration {report.seconds:.1f} s", flush=True)
    return result, (pruned_config, jax.device_get(pruned))

  systems, results = {"base": (config, params)}, {m: {} for m in methods}
  for method in methods:
    for r in ratios:
      results[method][r], systems[(method, r)] = run(method, method, r)
  ablation_ratios = (ratios if not common.QUICK.value else ratios[-1:]) if common.pick(_ABLATIONS, True, False) else []
  ablations = {name: {r: run(name, "slimllm", r, **options)[0] for r in ablation_ratios}
               for name, options in ABLATIONS.items()} if ablation_ratios else {}
  seconds = small_lm.prefill_seconds(systems, prefill_tokens, setup["repeats"])
  for (method, r) in (k for k in systems if k != "base"):
    results[method][r]["prefill_speedup"] = seconds["base"] / seconds[(method, r)]
    # What the matmuls alone would give: the speed-up a compute-bound prefill tends to.
    results[method][r]["flops_speedup"] = (models.forward_matmul_flops_per_token(config, SEQ_LEN)
                                           / models.forward_matmul_flops_per_token(systems[(method, r)][0], SEQ_LEN))
  status, reason = verdict(results, ratios)
  preset = common.pick(_TIMING_PRESET, "small", "")
  timing = time_preset(preset, timed_methods, calibration) if preset else None
  # The goal is stated on the `small` preset: its timing when measured, else this experiment's own model.
  timed = timing["seconds"] if timing else {f"{m}_{r}": v["calibration_seconds"] for m in methods
                                           for r, v in results[m].items()}
  goals = {"prefill_speedup_50": {m: results[m]["50"]["prefill_speedup"] for m in methods} if "50" in ratios else {},
           "prefill_speedup_goal": PREFILL_GOAL,
           "calibration_seconds_max": max(timed.values()), "calibration_slowest": max(timed, key=timed.get),
           "calibration_timed_on": timing["preset"] if timing else "the experiment's base model",
           "calibration_seconds_goal": 120}
  payload = {
      "base": base, "methods": results, "claim": CLAIM, "paper": PAPER,
      "verdict": {"status": status, "reason": reason}, "goals": goals, "ablations": ablations,
      "prefill_seconds": {"base": seconds["base"], **{f"{m}_{r}": s for (m, r), s in
                                                        ((k, v) for k, v in seconds.items() if k != "base")}},
      "training": {k: v for k, v in training.items() if k != "signature"},
      "setup": {**setup, "methods": methods, "ratios": ratios, "calibration": [_CALIBRATION.value, SEQ_LEN],
                "batch": BATCH, "seq_len": SEQ_LEN, "prefill_batch": [PREFILL_BATCH, SEQ_LEN],
                "layer_ratios": "SlimLLM's per-layer ratios (spec 3.1) for every method; layer_drop drops layers",
                "recovery": "each method's own (slimllm: channel_affine, flap: mean_shift, others: none)",
                "quick": common.QUICK.value, **common.machine_info()},
  }
  if timing:
    payload["calibration_timing"] = timing
  payload["claims"] = claims(payload)
  common.write_json("pruning", payload)
  plot(base, results, ratios)
  common.write_table("pruning", report_table(payload))

if __name__ == "__main__":
  app.run(main)
