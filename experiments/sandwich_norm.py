"""Pangu Ultra's depth-scaled sandwich norm vs Pre-LN and plain sandwich on a deep, narrow LM at a high LR.

  python -m experiments.sandwich_norm --quick

Variants (spec pangu_ultra.md, section 4): (A) `pre`: Pre-LN + small init, the paper's baseline;
(B) `sandwich`: post gains 1, TinyInit; (C) `depth_scaled_sandwich`: DSSN + TinyInit, the paper's method;
(D) `dssn_small_init`: DSSN + small init, isolating TinyInit. Same data order, seeds, optimizer and schedule.
A sweep then looks for the paper's regime: learning rates x depths x seeds (--sweep_lrs, --sweep_layers; 2 seeds, 1
in quick mode), every variant at every point with the spike detector fixed beforehand (the train loop's, set on a
pilot run).
Writes results/sandwich_norm.json: {"variants": {name: {final_loss, val_loss, loss_spikes, grad_norm_spikes,
max_grad_norm, diverged, "gains_over_training": {"steps": [s], norm: {"mean", "std"}: [snapshot][layer]}, ...}},
"sweep": {lr: {variant: {"loss_spikes", "grad_norm_spikes", "diverged",
"final_loss"}}} (each a list over "sweep_runs", the (layers, seed) of every run), "setup": {...}} and
sandwich_norm.png (loss and log grad norm per step; DSSN's four norm gains over training, Fig. 10).
"""

from absl import app, flags

from experiments import common

_STEPS = flags.DEFINE_integer("steps", None, "Steps per variant.", lower_bound=1)
_LR = flags.DEFINE_float("lr", None, "Peak learning rate, shared by every variant.")
_LAYERS = flags.DEFINE_integer("layers", None, "Depth of the narrow model.", lower_bound=1)
_WIDTH = flags.DEFINE_integer("width", None, "Model width.", lower_bound=8)
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Sequence length.", lower_bound=8)
_SEEDS = flags.DEFINE_integer("seeds", None, "Seeds per variant (different init and data order).", lower_bound=1)
_VARIANTS = flags.DEFINE_list("variants", None, "Variants to run.")
_SWEEP_LRS = flags.DEFINE_list("sweep_lrs", None, "Peak learning rates of the sweep.")
_SWEEP_LAYERS = flags.DEFINE_list("sweep_layers", None, "Depths of the sweep.")
_SWEEP_STEPS = flags.DEFINE_integer("sweep_steps", None, "Steps per sweep run.", lower_bound=1)

# Unset flags take these; --quick is sized for `make repro` on 2 cores.
FULL = dict(steps=600, lr=3e-2, layers=32, width=64, seq_len=128, seeds=2,
            variants=["pre", "sandwich", "depth_scaled_sandwich", "dssn_small_init"],
            sweep_lrs=["1e-2", "3e-2", "1e-1", "3e-1"], sweep_layers=["16", "32"], sweep_steps=300,
            sweep_variants=("pre", "sandwich", "depth_scaled_sandwich"), sweep_seeds=2)
# Quick keeps the two variants the claims compare, in the main runs and the sweep (each variant costs the report
# about a minute), one sweep seed and the two highest learning rates (the main runs are at 3e-2); full mode adds
# plain sandwich and DSSN with small init, a second seed and lrs 1e-2 and 3e-2.
QUICK = dict(FULL, steps=100, width=32, seq_len=64, seeds=1, variants=["pre", "depth_scaled_sandwich"],
             sweep_lrs=["1e-1", "3e-1"], sweep_layers=["8"], sweep_steps=40,
             sweep_variants=("pre", "depth_scaled_sandwich"), sweep_seeds=1)
SWEEP_METRICS = ("loss_spikes", "grad_norm_spikes", "diverged", "final_loss")

VARIANTS = {
    "pre": dict(norm_placement="pre", init="small"),
    "sandwich": dict(norm_placement="sandwich", init="tiny"),
    "depth_scaled_sandwich": dict(norm_placement="depth_scaled_sandwich", init="tiny"),
    "dssn_small_init": dict(norm_placement="depth_scaled_sandwich", init="small"),
}
BATCH, WARMUP = 16, 20
GAIN_SNAPSHOTS = 10  # norm-gain statistics recorded about this many times per run (Fig. 10)


def run_variant(name: str, seed: int, setup: dict, mesh, train_data, val_data) -> dict:
  import jax
  import numpy as np

  from pangu import data, models
  from pangu.models.norm_gains import norm_gain_stats
  from pangu.train.config import TrainConfig
  from pangu.train.loop import LoopConfig, train

  model = models.TransformerConfig(
      vocab_size=384, d_model=setup["width"], n_layers=setup["layers"], n_heads=4, n_kv_heads=2,
      d_ff=int(setup["width"] * 8 / 3) // 8 * 8, **VARIANTS[name])
  steps, lr = setup["steps"], setup["lr"]
  train_config = TrainConfig(peak_lr=lr, end_lr=lr / 10, warmup_steps=WARMUP, total_steps=steps)
  batches = data.BatchIterator(train_data, global_batch_size=BATCH, seed=seed)
  gains = {"steps": []}
  probe_every = max(steps // GAIN_SNAPSHOTS, 1)

  def record_gains(step, _record, state):
    if step % probe_every == 0 or step == steps - 1:
      gains["steps"].append(step)
      for norm, stats in norm_gain_stats(jax.device_get(state.params)).items():
        for stat, per_layer in stats.items():
          gains.setdefault(norm, {"mean": [], "std": []})[stat].append(per_layer)

  state, history = train(model, train_config, LoopConfig(steps=steps, seed=seed), batches, mesh, on_step=record_gains)
  forward = jax.jit(lambda p, x: models.forward(model, p, x))
  val = [float(models.cross_entropy_loss(forward(state.params, b["inputs"]), b["targets"], b["mask"])[0])
         for b in data.eval_batches(val_data, global_batch_size=BATCH, max_batches=8)]
  losses = np.array([h["loss"] for h in history])
  grad_norms = np.array([h["grad_norm"] for h in history])
  thresholds = train_config.spikes.thresholds
  last = history[-1]
  diverged = bool(not np.all(np.isfinite(losses)) or losses[WARMUP:].max() > losses[0])
  result = {
      "final_loss": float(np.mean(losses[-10:])),
      "val_loss": float(np.mean(val)),
      "loss_spikes": last[f"loss_spike_events_k{thresholds[0]:g}"],
      "grad_norm_spikes": last[f"log_grad_norm_spike_events_k{thresholds[0]:g}"],
      "spikes_by_threshold": {f"k{k:g}": {"loss": last[f"loss_spike_events_k{k:g}"],
                                           "grad_norm": last[f"log_grad_norm_spike_events_k{k:g}"]}
                              for k in thresholds},
      "max_grad_norm": float(np.nanmax(grad_norms)),
      "diverged": diverged,
      "config": {k: getattr(model, k) for k in ("norm_placement", "init", "n_layers", "d_model")},
      "loss_curve": losses.tolist(),
      "grad_norm_curve": grad_norms.tolist(),
  }
  result["gains_over_training"] = gains
  return result


def claims(payload: dict) -> list[dict]:
  """Pangu Ultra's claim, judged on the `pre` vs `depth_scaled_sandwich` runs of this payload."""
  pre, dssn = payload["variants"]["pre"], payload["variants"]["depth_scaled_sandwich"]
  spikes = lambda v: v["loss_spikes"] + v["grad_norm_spikes"]
  if dssn["diverged"] and not pre["diverged"] or spikes(dssn) > spikes(pre):
    verdict = "contradicted"
  elif spikes(pre) == 0 and not pre["diverged"]:
    verdict = "not reproduced"  # no instability for DSSN to remove at this learning rate and depth
  elif spikes(dssn) == 0 and not dssn["diverged"]:
    verdict = "reproduced"
  else:
    verdict = "partly"
  ours = (f"spikes (loss + grad norm) pre {pre['loss_spikes']} + {pre['grad_norm_spikes']}, DSSN "
          f"{dssn['loss_spikes']} + {dssn['grad_norm_spikes']}; final loss {pre['final_loss']:.3f} vs "
          f"{dssn['final_loss']:.3f} ({payload['setup']['layers']} layers, lr {payload['setup']['lr']:g})")
  return [common.claim("Pangu Ultra", "Depth-scaled sandwich norm + TinyInit trains without the loss spikes "
                       "Pre-LN shows at the same learning rate", "135B: no loss spikes with DSSN (Fig. 3)", ours,
                       verdict), sweep_claim(payload), gains_claim(payload)]


def gains_claim(payload: dict) -> dict:
  """Fig. 10 on the DSSN run: do all four gains shrink in training, and do the post-norm gains' mean and std grow
  with depth (Spearman correlation with the layer index > 0 at the end)?"""
  import numpy as np
  from scipy import stats

  gains = payload["variants"]["depth_scaled_sandwich"]["gains_over_training"]
  norms = [n for n in gains if n != "steps"]
  shrank = [n for n in norms if np.mean(gains[n]["mean"][-1]) < np.mean(gains[n]["mean"][0])]
  post = [(n, s) for n in norms if n.startswith("post") for s in ("mean", "std")]
  rho = {f"{n} {s}": stats.spearmanr(np.arange(len(gains[n][s][-1])), gains[n][s][-1]).statistic for n, s in post}
  grew = [k for k, r in rho.items() if r > 0]
  held = (len(shrank) == len(norms)) + (len(grew) == len(rho))
  verdict = "reproduced" if held == 2 else "partly" if held == 1 or shrank or grew else "not reproduced"
  ours = (f"{len(shrank)}/{len(norms)} gains shrank (layer-mean, step {gains['steps'][0]} -> {gains['steps'][-1]}); "
          "depth correlation of the final post gains: " + ", ".join(f"{k} {r:+.2f}" for k, r in rho.items()))
  return common.claim("Pangu Ultra", "All four norm gains shrink over training; the post-norm gains' mean and std "
                      "grow with depth", "Fig. 10 (135B)", ours, verdict)


def sweep_claim(payload: dict) -> dict:
  """Across the sweep: wherever Pre-LN spikes or diverges, does DSSN stay smooth?"""
  bad = lambda m, i: m["loss_spikes"][i] + m["grad_norm_spikes"][i] > 0 or m["diverged"][i]
  pre_bad = dssn_bad = 0
  for by_variant in payload["sweep"].values():
    pre, dssn = by_variant["pre"], by_variant["depth_scaled_sandwich"]
    for i in range(len(payload["sweep_runs"])):
      if bad(pre, i):
        pre_bad += 1
        dssn_bad += bad(dssn, i)
  total = len(payload["sweep"]) * len(payload["sweep_runs"])
  if pre_bad == 0:
    verdict = "not reproduced"  # Pre-LN never spiked: no regime here for DSSN to fix
  else:
    verdict = "reproduced" if dssn_bad == 0 else "partly" if dssn_bad < pre_bad else "contradicted"
  lrs = ", ".join(payload["sweep"])
  return common.claim("Pangu Ultra", "Across learning rates and depths, DSSN stays smooth where Pre-LN spikes",
                      "135B: no loss spikes with DSSN (Fig. 3)",
                      f"Pre-LN spiked or diverged in {pre_bad}/{total} runs (lr {lrs}; depths "
                      f"{payload['setup']['sweep_layers']}; {payload['setup']['sweep_seeds']} seeds); DSSN did in "
                      f"{dssn_bad} of those",
                      verdict)


def run_sweep(setup: dict, mesh, train_data, val_data) -> tuple[dict, list]:
  """lr -> variant -> metric -> [one value per (layers, seed) run], and the runs' (layers, seed) labels."""
  runs = [{"layers": int(layers), "seed": seed} for layers in setup["sweep_layers"]
          for seed in range(setup["sweep_seeds"])]
  sweep = {}
  for lr in setup["sweep_lrs"]:
    sweep[lr] = {}
    for name in setup["sweep_variants"]:
      results = [run_variant(name, run["seed"], {**setup, "lr": float(lr), "layers": run["layers"],
                                                 "steps": setup["sweep_steps"]}, mesh, train_data, val_data)
                 for run in runs]
      sweep[lr][name] = {k: [r[k] for r in results] for k in SWEEP_METRICS}
      print(f"sweep lr {lr} {name}: spikes {sweep[lr][name]['loss_spikes']} diverged {sweep[lr][name]['diverged']}",
            flush=True)
  return sweep, runs


def plot(variants: dict) -> None:
  import numpy as np
  fig, axes = common.new_figure(ncols=3, size=(6, 4))
  for name, r in variants.items():
    axes[0, 0].plot(r["loss_curve"], label=name, lw=1)
    axes[0, 1].semilogy(r["grad_norm_curve"], label=name, lw=1)
  axes[0, 0].set(xlabel="step", ylabel="training loss", title="loss")
  axes[0, 1].set(xlabel="step", ylabel="grad norm (before clipping)", title="gradient norm")
  axes[0, 0].legend(fontsize=8)
  if "depth_scaled_sandwich" in variants:
    gains = variants["depth_scaled_sandwich"]["gains_over_training"]
    for norm in (n for n in gains if n != "steps"):
      mean, std = np.mean(gains[norm]["mean"], axis=1), np.mean(gains[norm]["std"], axis=1)
      line, = axes[0, 2].plot(gains["steps"], mean, label=norm, lw=1)
      axes[0, 2].fill_between(gains["steps"], mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes[0, 2].set(xlabel="step", ylabel="gain (mean over layers; band: channel std)",
                   title="DSSN norm gains")
    axes[0, 2].legend(fontsize=8)
  common.save_figure(fig, "sandwich_norm")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  defaults = QUICK if common.QUICK.value else FULL
  setup = {k: (getattr(flag, "value") if flag.value is not None else defaults[k]) for k, flag in (
      ("steps", _STEPS), ("lr", _LR), ("layers", _LAYERS), ("width", _WIDTH), ("seq_len", _SEQ_LEN),
      ("seeds", _SEEDS), ("variants", _VARIANTS), ("sweep_lrs", _SWEEP_LRS), ("sweep_layers", _SWEEP_LAYERS),
      ("sweep_steps", _SWEEP_STEPS))}
  setup["sweep_variants"], setup["sweep_seeds"] = list(defaults["sweep_variants"]), defaults["sweep_seeds"]
  for flag in ("sweep_lrs", "sweep_layers"):
    try:
      [float(v) for v in setup[flag]]
    except ValueError:
      raise app.UsageError(f"--{flag} must be numbers, got {setup[flag]}") from None
  unknown = set(setup["variants"]) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f"unknown --variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
  import jax

  from pangu import data
  from pangu.parallel import cpu_mesh

  corpus = data.CorpusConfig(max_files=200 if common.QUICK.value else None)
  tokenizer = data.ByteTokenizer()
  train_data = data.LMDataset.build(tokenizer, corpus, split="train", seq_len=setup["seq_len"])
  val_data = data.LMDataset.build(tokenizer, data.CorpusConfig(), split="validation", seq_len=setup["seq_len"])
  mesh = cpu_mesh(data=len(jax.devices()))
  variants = {}
  for name in setup["variants"]:
    runs = [run_variant(name, seed, setup, mesh, train_data, val_data) for seed in range(setup["seeds"])]
    variants[name] = runs[0] if len(runs) == 1 else {**runs[0], "seeds": runs}
    print(f"{name}: final_loss {runs[0]['final_loss']:.3f} spikes {runs[0]['loss_spikes']} "
          f"max_grad_norm {runs[0]['max_grad_norm']:.3g} diverged {runs[0]['diverged']}", flush=True)
  sweep, sweep_runs = run_sweep(setup, mesh, train_data, val_data)
  payload = {"variants": variants, "sweep": sweep, "sweep_runs": sweep_runs,
             "setup": {**setup, "batch": BATCH, "warmup_steps": WARMUP, "quick": common.QUICK.value,
                       "spike_rule": "x_t > ema_mean + k * ema_std (EMA decay 0.9, 20 warmup steps), k in (3, 6); "
                                     "decay set on a pilot run at lr 3e-2",
                       **common.machine_info()}}
  payload["claims"] = claims(payload)
  common.write_json("sandwich_norm", payload)
  plot(variants)
  rows = [{"variant": n, **{k: v[k] for k in ("final_loss", "val_loss", "loss_spikes", "grad_norm_spikes",
                                               "max_grad_norm", "diverged")}} for n, v in variants.items()]
  sweep_rows = [{"lr": lr, "variant": name, "runs (layers/seed)": " ".join(f"{r['layers']}/{r['seed']}"
                                                                         for r in sweep_runs),
                 **{k: " ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in m[k]) for k in SWEEP_METRICS}}
                for lr, by_variant in sweep.items() for name, m in by_variant.items()]
  common.write_table("sandwich_norm", "\n\n".join([
      common.format_table(rows, ["variant", "final_loss", "val_loss", "loss_spikes", "grad_norm_spikes",
                                 "max_grad_norm", "diverged"]),
      f"Sweep ({setup['sweep_steps']} steps per run, every seed listed):",
      common.format_table(sweep_rows, ["lr", "variant", "runs (layers/seed)", *SWEEP_METRICS])]))


if __name__ == "__main__":
  app.run(main)
