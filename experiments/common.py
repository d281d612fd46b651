"""What every experiment script shares: the --quick / --results_dir flags, result JSON, plots, tables, and the
paper claims each experiment checks with a verdict computed from its own results (`claim`).

Importing this module before JAX gives CPU runs the 8 fake devices the experiments are written for (an
explicit XLA_FLAGS wins; see `xla_host`).
"""

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from experiments import xla_host

xla_host.use_cpu_devices(8)

from absl import flags  # noqa: E402

QUICK = flags.DEFINE_bool("quick", False, "Run the fast configuration (the one `make repro` uses).")
RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Folder for <name>.json and <name>.png.")


VERDICTS = ("reproduced", "partly", "not reproduced", "contradicted")


def pick(flag: flags.FlagHolder, full: Any, quick: Any) -> Any:
  """An explicitly given flag's value, else the --quick or the full default: the one rule every experiment uses
  (explicit flags beat quick defaults)."""
  if flag.value is not None:
    return flag.value
  return quick if QUICK.value else full


def claim(paper: str, text: str, paper_figure: str, ours: str, verdict: str) -> dict[str, str]:
  """One row of REPORT.md's verdict table. An experiment computes `ours` and `verdict` from the payload it
  writes and stores the rows under the payload's "claims" key, so the report types nothing by hand."""
  if verdict not in VERDICTS:
    raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
  return {"paper": paper, "claim": text, "paper_figure": paper_figure, "ours": ours, "verdict": verdict}


def median_ms(fn, repeats: int) -> float:
  """Median wall time of `fn()` in ms over `repeats` calls after one warm-up (compile) call, each call waited
  for with `jax.block_until_ready`: the one timing rule the benchmarks share."""
  import jax
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return 1e3 * sorted(times)[len(times) // 2]


def interleaved_seconds(fns: dict[Any, Callable[[], Any]], rounds: int) -> dict[Any, list[float]]:
  """Wall seconds of every `fns[name]()` per round, each waited for with `jax.block_until_ready`, the contenders
  taking turns round after round (after one warm-up call each), so load that comes and goes on a shared machine
  hits all of them alike: the rule for comparisons made side by side in one run."""
  import jax
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


def machine_info() -> dict[str, Any]:
  import jax
  return {"jax": jax.__version__, "backend": jax.default_backend(), "devices": len(jax.devices()),
          "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}


def write_json(name: str, payload: dict[str, Any], results_dir: str | None = None) -> str:
  """Writes <results_dir>/<name>.json atomically (temp file + rename), so readers never see half a file."""
  results_dir = results_dir or RESULTS_DIR.value
  os.makedirs(results_dir, exist_ok=True)
  path = os.path.join(results_dir, f"{name}.json")
  with tempfile.NamedTemporaryFile("w", dir=results_dir, delete=False, suffix=".tmp") as f:
    json.dump(payload, f, indent=2, sort_keys=False, allow_nan=True)
  os.replace(f.name, path)
  return path


def save_figure(fig, name: str, results_dir: str | None = None) -> str:
  results_dir = results_dir or RESULTS_DIR.value
  os.makedirs(results_dir, exist_ok=True)
  path = os.path.join(results_dir, f"{name}.png")
  fig.savefig(path, dpi=120, bbox_inches="tight")
  return path


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 3.5)):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)


def write_table(name: str, table: str, results_dir: str | None = None) -> str:
  """Prints the table and keeps it as <results_dir>/<name>.md for the reproduction report."""
  print(table)
  results_dir = results_dir or RESULTS_DIR.value
  os.makedirs(results_dir, exist_ok=True)
  path = os.path.join(results_dir, f"{name}.md")
  with open(path, "w") as f:
    f.write(table + "\n")
  return path


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  """A GitHub-markdown table (it prints readably and pastes into REPORT.md)."""
  def cell(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)
