"""The reproduction report: runs each experiment, then gathers their tables and plots in REPORT.md.

  python -m experiments.reproduce --quick --results_dir=results

Each experiment runs as its own process (`python -m experiments.<name>`), exactly as a researcher would run it,
so one failing study is reported without hiding the others.
"""

import os
import subprocess
import sys
import time

from absl import app, flags

from experiments import common

# (experiment module, one-line claim under test). Benchmarks are run on demand, not here.
EXPERIMENTS = (
    ("sandwich_norm", "Pangu Ultra: depth-scaled sandwich norm + TinyInit trains a deep model without loss "
                      "spikes at an LR where Pre-LN spikes."),
    ("moge_balance", "Pangu Pro MoE: MoGE has Imbalance Score 0 and max/mean expert-parallel device load exactly "
                     "1.0 where top-K does not, at comparable quality."),
    ("mole", "MoLE: the lookup table reproduces the trained experts exactly; decoding with the table off the "
             "device is about as fast as dense and far faster than offloaded MoE."),
)
_ONLY = flags.DEFINE_list("only", None, "Run only these experiments.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  results_dir = common.RESULTS_DIR.value
  selected = [e for e in EXPERIMENTS if not _ONLY.value or e[0] in _ONLY.value]
  sections = ["# Reproduction report", "",
              f"Mode: {'quick' if common.QUICK.value else 'full'}. Machine: {common.machine_info()}.", ""]
  failures = []
  for name, claim in selected:
    cmd = [sys.executable, "-m", f"experiments.{name}", f"--results_dir={results_dir}"]
    cmd += ["--quick"] if common.QUICK.value else []
    print(f"== {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd)
    seconds = time.perf_counter() - start
    sections += [f"## {name}", "", claim, "", f"Run time: {seconds:.0f} s. Result: `{name}.json`.", ""]
    table = os.path.join(results_dir, f"{name}.md")
    if proc.returncode != 0 or not os.path.exists(table):
      failures.append(name)
      sections += [f"**Failed** (exit code {proc.returncode}).", ""]
      continue
    with open(table) as f:
      sections += [f.read(), f"![{name}]({name}.png)", ""]
  report = os.path.join(results_dir, "REPORT.md")
  with open(report, "w") as f:
    f.write("\n".join(sections))
  print(f"wrote {report}")
  if failures:
    raise SystemExit(f"experiments failed: {failures}")


if __name__ == "__main__":
  app.run(main)
