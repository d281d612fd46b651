"""The reproduction report: runs each experiment, then writes REPORT.md with the verdict table and every study.

  python -m experiments.reproduce --quick --results_dir=results [--only=mole,moge_balance] [--skip=simulate_ascend]

Each experiment runs as its own process (`python -m experiments.<name>`), exactly as a researcher would run it,
so one failing study is reported without hiding the others. The report opens with one row per paper claim:
each experiment computes its claims' verdicts from its own results and stores them under "claims" in its JSON
(`common.claim`); nothing here is typed by hand. A progress line per experiment gives the elapsed time and an
ETA from the durations of the previous run (kept in <results_dir>/reproduce_times.json).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments import common, xla_host

# (module, what it studies, expected --quick seconds on 2 cores when no previous run says otherwise: measured
# 2026-12-06 16:16-16:40 in the `make repro` of a fresh clone, rounded: 1421 s in all, 24.2 min with the venv;
# earlier report runs on the same machine took 1151-1758 s); dit_ptq: 430 s, from 660 s in that of 2026-12-07
# 22:46-23:24 (width 96, 6000 training steps in two micro-batches, no replicate models, two host devices; 39.0 min in
# all with the venv), where the other eleven ran 1.55x their expected seconds.
# The benchmarks (`experiments.bench_*`: no paper claim) run on demand: bench_decode and bench_train_step compare
# against PyTorch (the `bench` extra); bench_moe_layer, bench_moe_routing and bench_attention time kernels and
# exchanges that only a GPU makes informative (on CPU they cost ~1 min of the quick budget).
EXPERIMENTS = (
    ("sandwich_norm", "Pangu Ultra: depth-scaled sandwich norm + TinyInit vs Pre-LN on a deep, narrow LM.", 84),
    ("moge_balance", "Pangu Pro MoE: MoGE vs top-K load balance, Monte-Carlo and expert-parallel training.", 77),
    ("balance_scope", "Pangu Ultra MoE: the balance loss over each device, each EP group or the global batch; "
                      "balance per EP group and expert specialisation per text domain.", 34),
    ("simulate_ascend", "Pangu Ultra MoE / Pro MoE: the calibrated performance simulator and the papers' layouts.",
     23),
    ("mole", "MoLE: lookup experts vs dense and offloaded MoE, table exactness and decode latency.", 113),
    ("pruning", "SlimLLM: structured pruning at 20 % and 50 % against magnitude, Wanda-sp, FLAP, Taylor and layer "
                "drop; perplexity without tuning, parameters and prefill speed-up.", 158),
    ("pangu_light", "Pangu Light: joint width + depth pruning with CLAP / SLNP vs truncation and SlimLLM, before and "
                    "after the same distillation budget (reuses the pruning experiment's cached base).", 84),
    ("sdtp", "SDTP: saliency-driven token pruning vs random, attention-score and no pruning on a retrieval task; "
             "prefill FLOPs and speed-up vs prompt length (trains the retrieval LM it shares with specache).", 156),
    ("specache", "SpeCache: speculative top-k prefetch over a 1/2-bit KIVI copy vs KIVI, H2O, StreamingLLM and the "
                 "full cache on needle retrieval at matched device memory (reuses sdtp's cached retrieval LM).", 146),
    ("dit_ptq", "HTG: timestep-aware W8A8 / W4A8 post-training quantisation of a small DiT on digits against naive, "
                "SmoothQuant-style and PTQ4DiT-style PTQ, each also with GPTQ-rounded weights; G sweep and the spec's "
                "ablations (the first run trains the DiT; re-runs reuse it).",
     430),
    ("embedded_dual", "Pangu Embedded: iterative distillation with merging, then fast / slow / auto modes of a "
                      "byte-level student trained from scratch.", 82),
    ("embedded_rl", "Pangu Embedded: the SSP scheduler with a priority queue under long-tail generation lengths "
                    "(s = 0, 1, 2); GRPO with MARS on the distilled student once it exists.", 89),
)
_ONLY = flags.DEFINE_list("only", None, "Run only these experiments.")
_SKIP = flags.DEFINE_list("skip", None, "Run all but these experiments.")


def _selected() -> list[tuple[str, str, int]]:
  names = {name for name, _, _ in EXPERIMENTS}
  for flag in (_ONLY, _SKIP):
    unknown = set(flag.value or ()) - names
    if unknown:
      raise app.UsageError(f"--{flag.name}: unknown experiments {sorted(unknown)}; known: {sorted(names)}")
  return [e for e in EXPERIMENTS if (not _ONLY.value or e[0] in _ONLY.value) and e[0] not in (_SKIP.value or ())]


def _experiment_env(compilation_cache: str) -> dict[str, str]:
  """This process's environment for an experiment: the XLA_FLAGS it started with (importing `common` set the
  8-device default here, which would override the one-device default of the experiments that choose it), and
  one compilation cache for the run, so a step compiled again (a new `train` call, a re-jitted lambda) is read
  back instead (a folder the user gave wins)."""
  env = dict(os.environ)
  if xla_host.STARTING_XLA_FLAGS is None:
    env.pop("XLA_FLAGS", None)
  else:
    env["XLA_FLAGS"] = xla_host.STARTING_XLA_FLAGS
  env.setdefault("JAX_COMPILATION_CACHE_DIR", compilation_cache)
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  return env


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def verdict_table(claims: list[dict]) -> str:
  rows = [{"paper": c["paper"], "claim": c["claim"], "paper's figure": c["paper_figure"], "our figure": c["ours"],
           "verdict": f"**{c['verdict']}**"} for c in claims]
  return common.format_table(rows, ["paper", "claim", "paper's figure", "our figure", "verdict"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  results_dir = common.RESULTS_DIR.value
  os.makedirs(results_dir, exist_ok=True)
  selected = _selected()
  times_file = os.path.join(results_dir, "reproduce_times.json")
  expected = {name: seconds for name, _, seconds in EXPERIMENTS} | _read_json(times_file)
  sections, claims, failures, took = [], [], [], {}
  begin = time.perf_counter()
  with tempfile.TemporaryDirectory() as compilation_cache:
    for index, (name, description, _) in enumerate(selected):
      cmd = [sys.executable, "-m", f"experiments.{name}", f"--results_dir={results_dir}"]
      cmd += ["--quick"] if common.QUICK.value else []
      elapsed = time.perf_counter() - begin
      eta = sum(expected[n] for n, _, _ in selected[index:])
      print(f"[{index + 1}/{len(selected)}] {name}: elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min "
            f"({' '.join(cmd[1:])})", flush=True)
      start = time.perf_counter()
      proc = subprocess.run(cmd, env=_experiment_env(compilation_cache))
      took[name] = time.perf_counter() - start
      sections += [f"## {name}", "", description, "", f"Run time: {took[name]:.0f} s. Result: `{name}.json`.", ""]
      table = os.path.join(results_dir, f"{name}.md")
      if proc.returncode != 0 or not os.path.exists(table):
        failures.append(name)
        sections += [f"**Failed** (exit code {proc.returncode}).", ""]
        continue
      claims += _read_json(os.path.join(results_dir, f"{name}.json")).get("claims", [])
      with open(table) as f:
        sections += [f.read(), f"![{name}]({name}.png)", ""]
  common.write_json("reproduce_times", {**_read_json(times_file), **took}, results_dir)
  header = ["# Reproduction report", "",
            f"Mode: {'quick' if common.QUICK.value else 'full'}. Machine: {common.machine_info()}. "
            f"Total time: {(time.perf_counter() - begin) / 60:.1f} min.", "",
            "## Verdicts", "", "Computed by each experiment from its own results (the `claims` of its JSON).", "",
            verdict_table(claims) if claims else "No experiment reported claims.", ""]
  report = os.path.join(results_dir, "REPORT.md")
  with open(report, "w") as f:
    f.write("\n".join(header + sections))
  print(f"wrote {report}")
  if failures:
    raise SystemExit(f"experiments failed: {failures}")


if __name__ == "__main__":
  app.run(main)
