"""Pangu Light vs plain truncation and SlimLLM: joint width + depth pruning to about half the non-embedding
parameters, each pruned model before and after the same knowledge-distillation budget.

  python -m experiments.pangu_light --quick

Spec shared/specs/pangu_light.md section 4 (Pangu Light, arXiv 2505.20155), on the small byte-level LM of the
pruning experiment (experiments/small_lm.py, cached under <results_dir>/pruning_base). Its shape (L, D, H, F) is
cut to the spec's proportions (L' = 10/12 L, D' = 3/4 D, H' = 3/4 H, F' = 512/704 F; flags override) with
pangu.compress.prune.pangu_light_prune in four variants: `truncate` (importance selection, layers dropped, gains
sliced: the Minitron-style baseline), `slnp` (+ SLNP), `clap` (+ CLAP), `clap_slnp` (Pangu Light), and
`random` (truncation with seeded random importances: the lower bound), and `slimllm`
(pangu.compress.prune.prune at the same non-embedding ratio, width only). Every variant is then distilled from the
unpruned model for the same steps on the same batches (logit KL at T = 1, pangu.train.distill.kd_loss in the
shared train step), with the validation perplexity along the way; `scratch` trains the same pruned shape from a
fresh init with the LM loss on those very batches (the spec's same-size-from-scratch comparison).

The paper's claim under test: the re-initialisation (CLAP + SLNP) beats plain truncation at equal distillation
budget, and beats other pruned models of the same size. The base model is pre-norm (the pruning experiment's), so
post-norm absorption has nothing to fold here; it is covered by the unit tests.

Writes <results_dir>/pangu_light.json: {"base": {"params", "ppl"}, "variants": {name: {"params", "ppl_before_kd",
"ppl_after_kd", "prefill_speedup"}}, "claims"}; pangu_light_details.json (setup, KD curves, pruning reports);
pangu_light.png (recovery curves) and pangu_light.md.
"""

import dataclasses
import math

from experiments import xla_host

# One CPU device, like the pruning experiment whose base model this loads (an explicit XLA_FLAGS still wins).
xla_host.use_cpu_devices(1)

from absl import app, flags  # noqa: E402

from experiments import common, small_lm  # noqa: E402

_KD_STEPS = flags.DEFINE_integer("kd_steps", None, "Distillation steps per variant (the same for all).",
                                 lower_bound=1)
_KD_EVAL_EVERY = flags.DEFINE_integer("kd_eval_every", None, "Steps between validation points of the KD curves.",
                                      lower_bound=1)
_KD_LR = flags.DEFINE_float("kd_lr", 1e-3, "Peak learning rate of distillation.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "KD temperature.")
_CALIBRATION = flags.DEFINE_integer("calibration", 32, "Calibration sequences of 128 tokens (spec: 32).",
                                    lower_bound=1)
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None, "Validation batches of 16 x 128 tokens.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed prefill rounds (best of).", lower_bound=1)
_TARGET_LAYERS = flags.DEFINE_integer("target_layers", None, "L' (default round(L * 10 / 12)).", lower_bound=1)
_TARGET_WIDTH = flags.DEFINE_integer("target_width", None, "D' (default 3/4 D).", lower_bound=1)
_TARGET_HEADS = flags.DEFINE_integer("target_heads", None, "H' (default 3/4 H).", lower_bound=1)
_TARGET_D_FF = flags.DEFINE_integer("target_d_ff", None, "F' (default round(F * 512 / 704)).", lower_bound=1)

FULL = dict(small_lm.BASE_FULL, kd_steps=400, kd_eval_every=50, eval_batches=32, repeats=20)
QUICK = dict(small_lm.BASE_QUICK, kd_steps=20, kd_eval_every=10, eval_batches=8, repeats=5)
PREFILL_BATCH = 8
VARIANTS = {"truncate": dict(depth_reinit="drop", slnp="none"), "slnp": dict(depth_reinit="drop", slnp="l2"),
            "clap": dict(depth_reinit="clap", slnp="none"), "clap_slnp": dict(depth_reinit="clap", slnp="l2"),
            "random": dict(depth_reinit="drop", slnp="none", importance="random")}
CLOSE = 0.01  # relative perplexity difference below which a comparison is a tie
PAPER = "Pangu Light-32B 81.6 avg at 2585 tok/s vs Qwen3-32B 80.9 at 2225 tok/s (Ascend NPU)"


def target_shape(setup: dict) -> dict:
  """The spec's pruned proportions of the base shape; explicit flags win."""
  default = {"n_layers": max(1, round(setup["layers"] * 10 / 12)), "d_model": setup["width"] * 3 // 4,
             "n_heads": max(1, setup["heads"] * 3 // 4), "d_ff": round(setup["d_ff"] * 512 / 704)}
  flags_ = {"n_layers": _TARGET_LAYERS, "d_model": _TARGET_WIDTH, "n_heads": _TARGET_HEADS, "d_ff": _TARGET_D_FF}
  return {k: flags_[k].value if flags_[k].value is not None else v for k, v in default.items()}


def recover(student_config, student_params, step_fn, train_config, train_data, val_batches: list, steps: int,
            every: int) -> tuple[dict, list[dict]]:
  """(trained params, [{"step", "ppl"}]): `steps` shared-train-step updates (KD, or CE for the from-scratch
  baseline) on batches drawn with one seed, so every variant sees the very same tokens."""
  import jax

  from pangu import data
  from pangu.train.loop import to_global_batch
  from pangu.train.optim import make_optimizer
  from pangu.train.step import init_train_state, state_shardings

  mesh = small_lm.data_mesh()
  state = init_train_state(student_config, train_config, jax.random.key(small_lm.SEED), mesh)
  state = jax.device_put(state.replace(params=student_params,
                                       opt_state=make_optimizer(train_config).init(student_params)),
                         state_shardings(student_config, train_config, mesh))
  batches = data.BatchIterator(train_data, global_batch_size=small_lm.BATCH, seed=small_lm.SEED + 1)
  ppl = lambda params: math.exp(small_lm.validation_loss(student_config, params, val_batches))
  curve = [{"step": 0, "ppl": ppl(student_params)}]
  for step in range(1, steps + 1):
    state, _ = step_fn(state, to_global_batch(next(batches), mesh))
    if step % every == 0 or step == steps:
      curve.append({"step": step, "ppl": ppl(jax.device_get(state.params))})
  return jax.device_get(state.params), curve


def _compare(a: float, b: float) -> int:
  """-1: a lower than b by more than CLOSE, 1: higher by more, 0: a tie."""
  return -1 if a < (1 - CLOSE) * b else 1 if a > (1 + CLOSE) * b else 0


def claims(payload: dict) -> list[dict]:
  """Verdicts computed from the JSON: (1) CLAP + SLNP vs truncation (and either alone) after equal KD;
  (2) CLAP + SLNP vs SlimLLM at the same size after equal KD; (3) re-initialised variants start lower."""
  v = payload["variants"]
  after = {name: r["ppl_after_kd"] for name, r in v.items()}
  best = after["clap_slnp"]
  vs_truncate = _compare(best, after["truncate"])
  singles = [_compare(best, after[n]) for n in ("clap", "slnp")]
  if vs_truncate < 0 and all(s < 0 for s in singles):
    status = "reproduced"
  elif vs_truncate < 0:
    status = "partly"
  elif vs_truncate > 0:
    status = "contradicted"
  else:
    status = "not reproduced"
  ours = (f"after equal KD: clap_slnp {best:.4g}, truncate {after['truncate']:.4g}, clap {after['clap']:.4g}, "
          f"slnp {after['slnp']:.4g} (perplexity per byte; ties within {CLOSE:.0%})")
  rows = [common.claim("Pangu Light", "CLAP + SLNP re-initialisation beats plain truncation at equal distillation "
                       "budget (and either alone)", "no ablation numbers public", ours, status)]
  vs_slim = _compare(best, after["slimllm"])
  rows.append(common.claim(
      "Pangu Light", "Pangu Light beats other pruned models of the same size", PAPER,
      f"after equal KD, same non-embedding ratio: clap_slnp {best:.4g} ({v['clap_slnp']['params']} params in all) "
      f"vs SlimLLM {after['slimllm']:.4g} ({v['slimllm']['params']}: SlimLLM keeps the full embedding width); "
      f"prefill {v['clap_slnp']['prefill_speedup']:.2f}x vs "
      f"{v['slimllm']['prefill_speedup']:.2f}x",
      "reproduced" if vs_slim < 0 else "contradicted" if vs_slim > 0 else "not reproduced"))
  before = {name: r["ppl_before_kd"] for name, r in v.items()}
  wins = [n for n in ("clap", "slnp", "clap_slnp") if _compare(before[n], before["truncate"]) < 0]
  rows.append(common.claim(
      "Pangu Light", "Re-initialised models start from a lower loss than truncation (before KD)",
      "spec prediction (unconfirmed)",
      "before KD: " + ", ".join(f"{n} {before[n]:.4g}" for n in ("truncate", "slnp", "clap", "clap_slnp")),
      "reproduced" if len(wins) == 3 else "partly" if wins else "not reproduced"))
  vs_scratch = _compare(best, after["scratch"])
  rows.append(common.claim(
      "Pangu Light", "Pruned + KD beats the same shape trained from scratch on as many tokens",
      "spec prediction (the analogue of Pangu Light-32B vs Qwen3-32B)",
      f"clap_slnp after KD {best:.4g} vs from scratch (CE, peak lr {small_lm.PEAK_LR:g}) {after['scratch']:.4g}",
      "reproduced" if vs_scratch < 0 else "contradicted" if vs_scratch > 0 else "not reproduced"))
  vs_random = _compare(after["truncate"], after["random"])
  rows.append(common.claim(
      "Pangu Light", "Activation importance beats random selection at equal KD (the ablation's lower bound)",
      "spec prediction (unconfirmed)",
      f"after KD: truncate {after['truncate']:.4g} vs random selection {after['random']:.4g}",
      "reproduced" if vs_random < 0 else "contradicted" if vs_random > 0 else "not reproduced"))
  return rows


def plot(base: dict, curves: dict) -> None:
  fig, axes = common.new_figure(size=(6, 4))
  ax = axes[0, 0]
  for name, curve in curves.items():
    ax.plot([p["step"] for p in curve], [p["ppl"] for p in curve], marker="o", ms=3, lw=1, label=name)
  ax.axhline(base["ppl"], color="gray", ls=":", lw=1, label="unpruned")
  ax.set(xlabel="distillation steps", ylabel="validation perplexity (per byte)", yscale="log",
         title="recovery by KD from the unpruned model")
  ax.legend(fontsize=7)
  common.save_figure(fig, "pangu_light")


def report_table(payload: dict, details: dict) -> str:
  setup, base = details["setup"], payload["base"]
  rows = [{"variant": "unpruned", "params": base["params"], "ppl_before_kd": base["ppl"], "ppl_after_kd": base["ppl"],
           "prefill_x": 1.0}]
  rows += [{"variant": name, "params": r["params"], "removed": details["achieved_ratio"][name],
            "ppl_before_kd": r["ppl_before_kd"], "ppl_after_kd": r["ppl_after_kd"],
            "prefill_x": r["prefill_speedup"]} for name, r in payload["variants"].items()]
  t = setup["target"]
  parts = [
      f"Base (the pruning experiment's): D={setup['width']}, L={setup['layers']}, {setup['heads']} heads, "
      f"F={setup['d_ff']}, pre-norm; validation perplexity {base['ppl']:.3f} per byte. Pruned to L'={t['n_layers']}, "
      f"D'={t['d_model']}, H'={t['n_heads']}, F'={t['d_ff']} with {setup['calibration']} x 128 calibration tokens; "
      f"SlimLLM at the same non-embedding ratio. Then {setup['kd_steps']} KD steps each (batch "
      f"{small_lm.BATCH} x {small_lm.SEQ_LEN}, logit KL at T={setup['temperature']}, peak lr {setup['kd_lr']}), the "
      f"same batches for every variant; prefill [{PREFILL_BATCH} x {small_lm.SEQ_LEN}] side by side, best of "
      f"{setup['repeats']} rounds.",
      common.format_table(rows, ["variant", "params", "removed", "ppl_before_kd", "ppl_after_kd", "prefill_x"])]
  parts += [f"{c['claim']}: **{c['verdict']}** ({c['ours']})" for c in payload["claims"]]
  return "\n\n".join(parts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  from pangu import models
  from pangu.compress.prune import LightOptions, LightTarget, pangu_light_prune, prune
  from pangu.train.config import TrainConfig
  from pangu.train.distill import kd_loss
  from pangu.train.step import make_train_step

  defaults = QUICK if common.QUICK.value else FULL
  setup = {k: defaults[k] for k in small_lm.BASE_FULL}
  for key, flag in (("kd_steps", _KD_STEPS), ("kd_eval_every", _KD_EVAL_EVERY), ("eval_batches", _EVAL_BATCHES),
                    ("repeats", _REPEATS)):
    setup[key] = flag.value if flag.value is not None else defaults[key]
  setup.update(target=target_shape(setup), calibration=_CALIBRATION.value, kd_lr=_KD_LR.value,
               temperature=_TEMPERATURE.value, quick=common.QUICK.value)
  results_dir = common.RESULTS_DIR.value

  train_data, val_batches = small_lm.load_data(common.QUICK.value, setup["eval_batches"])
  config, params, training = small_lm.train_base(setup, results_dir, train_data, val_batches)
  calibration = small_lm.calibration_rows(train_data, setup["calibration"])
  base = {"params": models.param_count(config),
          "ppl": math.exp(small_lm.validation_loss(config, params, val_batches))}
  print(f"base: {base['params']} params, ppl {base['ppl']:.3f}", flush=True)

  pruned, reports = {}, {}
  target = LightTarget(**setup["target"])
  for name, options in VARIANTS.items():
    pruned_config, pruned_params, reports[name] = pangu_light_prune(config, params, calibration, target=target,
                                                                    options=LightOptions(**options))
    pruned[name] = (pruned_config, pruned_params)
  ratio = reports["clap_slnp"].achieved_ratio
  slim_config, slim_params, slim_report = prune(config, params, calibration, method="slimllm", ratio=ratio)
  pruned["slimllm"], reports["slimllm"] = (slim_config, slim_params), slim_report

  steps, every = setup["kd_steps"], setup["kd_eval_every"]
  train_config = TrainConfig(peak_lr=setup["kd_lr"], end_lr=setup["kd_lr"] / 10,
                             warmup_steps=max(1, min(steps // 10, 20)), total_steps=steps, weight_decay=0.0)
  step_fns, curves, distilled = {}, {}, {}
  for name, (student_config, student_params) in pruned.items():
    if student_config not in step_fns:  # the Pangu Light variants share one shape, so one compiled step
      loss = kd_loss(student_config, config, params, temperature=setup["temperature"])
      step_fns[student_config] = make_train_step(student_config, train_config, small_lm.data_mesh(), loss_fn=loss)
    distilled[name], curves[name] = recover(student_config, student_params, step_fns[student_config], train_config,
                                            train_data, val_batches, steps, every)
    print(f"{name}: ppl {curves[name][0]['ppl']:.3f} -> {curves[name][-1]['ppl']:.3f} after {steps} KD steps",
          flush=True)
  # The same shape from scratch with the LM loss, on the same batches, at the base model's own learning rate.
  scratch_config = pruned["truncate"][0]
  scratch_train = dataclasses.replace(train_config, peak_lr=small_lm.PEAK_LR, end_lr=small_lm.PEAK_LR / 10)
  pruned["scratch"] = (scratch_config, models.init_params(scratch_config, jax.random.key(small_lm.SEED)))
  distilled["scratch"], curves["scratch"] = recover(
      scratch_config, pruned["scratch"][1], make_train_step(scratch_config, scratch_train, small_lm.data_mesh()),
      scratch_train, train_data, val_batches, steps, every)
  print(f"scratch: ppl {curves['scratch'][-1]['ppl']:.3f} after {steps} CE steps", flush=True)

  systems = {"base": (config, params), **{n: (pruned[n][0], distilled[n]) for n in pruned}}
  prefill_tokens = val_batches[0]["inputs"][:PREFILL_BATCH]
  seconds = small_lm.prefill_seconds(systems, prefill_tokens, setup["repeats"])
  variants = {name: {"params": models.param_count(pruned[name][0]), "ppl_before_kd": curves[name][0]["ppl"],
                     "ppl_after_kd": curves[name][-1]["ppl"], "prefill_speedup": seconds["base"] / seconds[name]}
              for name in pruned}
  payload = {"base": base, "variants": variants}
  payload["claims"] = claims(payload)
  details = {"setup": setup, "curves": curves, "prefill_seconds": seconds,
             "achieved_ratio": {**{n: r.achieved_ratio for n, r in reports.items()},
                                "scratch": reports["truncate"].achieved_ratio},
             "reports": {n: r.to_dict() for n, r in reports.items()},
             "training": {k: v for k, v in training.items() if k != "signature"}, **common.machine_info()}
  common.write_json("pangu_light", payload)
  common.write_json("pangu_light_details", details)
  plot(base, curves)
  common.write_table("pangu_light", report_table(payload, details))


if __name__ == "__main__":
  app.run(main)
