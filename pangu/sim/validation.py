"""Validation of the simulator against measurement: small configs timed with our own train step on the
8-device CPU mesh, then predicted with the calibrated `cpu(8)` topology (Ultra MoE spec §4.2).

Each case is a `TransformerConfig` (dense, MoGE or top-K MoE) and a `ParallelPlan` over (data, fsdp, expert,
tensor). `step_benchmarks` compiles every case first; `calibrate.time_rounds` then times one step of each case per
round, interleaved with the calibration microbenchmarks, so that drift of the shared machine hits them all
alike (`measure`: one run). `to_sim` maps a case to the simulator's inputs: dp = data · fsdp · expert (the
batch axes), ZeRO-3 over the fsdp axis, fp32 parameters and activations.

A calibration scored on the step times of its own run says little about another day on the shared machine, so
a second, independent run (`measure_in_subprocess`: `python -m pangu.sim measure` in a fresh process, with its
own XLA_FLAGS for 8 host devices) calibrates and measures again; `compare` of one run's calibration against the
other run's step times is the cross-run figure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import scipy.stats

from pangu.models.config import TransformerConfig
from pangu.nn.moe.config import MoEConfig
from pangu.nn.moe.parallel import exchange_for
from pangu.parallel.mesh import ParallelPlan
from pangu.sim import calibrate, shapes
from pangu.sim.calibrate import Benchmark, Calibration, decoder_config
from pangu.sim.plan import FP32, Plan, TrainWorkload
from pangu.sim.training import simulate_training

DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "calibration", "cpu8_steps.json")
# The second, independent run: calibration and step times measured in another process.
OTHER_CALIBRATION_PATH = os.path.join(os.path.dirname(__file__), "calibration", "cpu8_other_run.json")
OTHER_STEPS_PATH = os.path.join(os.path.dirname(__file__), "calibration", "cpu8_other_run_steps.json")
MESH_AXES = ("data", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class ValidationCase:
  """One measured configuration.

  Attributes:
    name: label.
    d_model, n_layers: the decoder's width and depth (4 heads of d_model / 4, 4 kv heads, FFN 2.75 D).
    mesh: sizes of the mesh axes data, fsdp, expert, tensor (product 8).
    batch, seq_len: the global batch of one step.
    moe: the MoE layer of every decoder layer, or None for a dense model.
    vocab_size: V.
  """

  name: str
  d_model: int
  n_layers: int
  mesh: tuple[tuple[str, int], ...]
  batch: int = 16
  seq_len: int = 128
  moe: MoEConfig | None = None
  vocab_size: int = 2048

  def __post_init__(self):
    sizes = dict(self.mesh)
    if not set(sizes) <= set(MESH_AXES) or math.prod(sizes.values()) != 8:
      raise ValueError(f"ValidationCase.mesh must size axes of {MESH_AXES} with product 8, got {self.mesh}")
    batch_splits = math.prod(sizes.get(axis, 1) for axis in ("data", "fsdp", "expert"))
    if self.batch % batch_splits:
      raise ValueError(f"ValidationCase.batch={self.batch} is not divisible by the {batch_splits} batch splits")

  def model_config(self) -> TransformerConfig:
    return decoder_config(self.d_model, self.n_layers, vocab_size=self.vocab_size, moe=self.moe)

  def parallel_plan(self) -> ParallelPlan:
    return ParallelPlan(**dict(self.mesh))

  def to_sim(self) -> tuple[shapes.ModelShape, Plan, TrainWorkload]:
    sizes = self.parallel_plan().axis_sizes
    dp = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    # The exchange our CPU MoE layer picks: the fixed all-to-all for MoGE with whole groups per device, else
    # the ring (all-gather + reduce-scatter).
    ring = self.moe is not None and sizes["expert"] > 1 and exchange_for(self.moe, sizes["expert"]) == "ring"
    plan = Plan(tp=sizes["tensor"], dp=dp, ep=sizes["expert"], micro_batch=self.batch // dp, sequence_parallel=False,
                zero_stage=3 if sizes["fsdp"] > 1 else 0, zero_shards=sizes["fsdp"], expert_zero_shards=sizes["fsdp"],
                ep_dispatch="ring" if ring else "flat")
    return shapes.from_config(self.model_config(), self.name), plan, TrainWorkload(self.seq_len, self.batch)


def _mesh(**sizes: int) -> tuple[tuple[str, int], ...]:
  return tuple(sizes.items())


_MOGE = MoEConfig(num_experts=8, top_k=2, expert_dim=128, router="moge", num_groups=2, aux_loss_coef=0.0)
_MOGE8 = MoEConfig(num_experts=16, top_k=8, expert_dim=64, router="moge", num_groups=8, aux_loss_coef=0.0)
_MOGE32 = MoEConfig(num_experts=32, top_k=4, expert_dim=96, router="moge", num_groups=4, aux_loss_coef=0.0)
_TOPK = MoEConfig(num_experts=8, top_k=2, expert_dim=128, router="topk", aux_loss_coef=0.0)
_TOPK16 = MoEConfig(num_experts=16, top_k=4, expert_dim=64, router="topk", aux_loss_coef=0.0)

# Width (128-640), depth (2-8), sequence, batch, TP / DP / FSDP / EP splits, MoGE and top-K experts (8-32):
# steps from a fifth of a second to a few seconds on 2 cores.
CASES = (
    ValidationCase("d128_l2_dp8", 128, 2, _mesh(data=8)),
    ValidationCase("d256_l2_dp8", 256, 2, _mesh(data=8)),
    ValidationCase("d256_l4_dp8", 256, 4, _mesh(data=8)),
    ValidationCase("d256_l2_fsdp8", 256, 2, _mesh(fsdp=8)),
    ValidationCase("d256_l2_dp4_tp2", 256, 2, _mesh(data=4, tensor=2)),
    ValidationCase("d256_l2_dp2_tp4", 256, 2, _mesh(data=2, tensor=4)),
    ValidationCase("d384_l2_fsdp4_tp2", 384, 2, _mesh(fsdp=4, tensor=2)),
    ValidationCase("d512_l2_fsdp8", 512, 2, _mesh(fsdp=8)),
    ValidationCase("d128_l6_dp2_fsdp4", 128, 6, _mesh(data=2, fsdp=4)),
    ValidationCase("d256_l2_dp8_s256", 256, 2, _mesh(data=8), batch=8, seq_len=256),
    ValidationCase("moge_d128_l2_dp4_ep2", 128, 2, _mesh(data=4, expert=2), moe=_MOGE),
    ValidationCase("moge_d256_l2_fsdp2_ep4", 256, 2, _mesh(fsdp=2, expert=4), moe=_MOGE),
    ValidationCase("moge8_d128_l2_ep8", 128, 2, _mesh(expert=8), moe=_MOGE8),
    ValidationCase("topk_d256_l2_dp4_ep2", 256, 2, _mesh(data=4, expert=2), moe=_TOPK),
    ValidationCase("d128_l8_dp8", 128, 8, _mesh(data=8)),
    ValidationCase("d640_l2_fsdp8", 640, 2, _mesh(fsdp=8)),
    ValidationCase("d384_l4_dp4_tp2_b32", 384, 4, _mesh(data=4, tensor=2), batch=32),
    ValidationCase("moge32_d256_l4_dp2_ep4", 256, 4, _mesh(data=2, expert=4), moe=_MOGE32),
    ValidationCase("topk16_d128_l4_fsdp2_ep4", 128, 4, _mesh(fsdp=2, expert=4), moe=_TOPK16),
)


def step_benchmarks(cases: tuple[ValidationCase, ...] = CASES,
                    log: Callable[[str], None] = print) -> list[Benchmark]:
  """One compiled, warmed-up train step per case (our `make_train_step` on the 8-device CPU mesh)."""
  import jax

  from pangu.parallel.mesh import make_mesh
  from pangu.parallel.topology import cpu
  from pangu.train.config import TrainConfig
  from pangu.train.step import init_train_state, make_train_step

  train_config = TrainConfig(warmup_steps=1, total_steps=1000)
  result = []
  for case in cases:
    config, mesh = case.model_config(), make_mesh(cpu(8), case.parallel_plan())
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (case.batch, case.seq_len + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "mask": np.ones((case.batch, case.seq_len), np.float32)}
    step = make_train_step(config, train_config, mesh)
    state = [init_train_state(config, train_config, jax.random.key(0), mesh)]

    def run(step=step, state=state, batch=batch):
      state[0], metrics = step(state[0], batch)
      jax.block_until_ready(metrics["loss"])

    start = time.perf_counter()
    run()
    run()
    log(f"compiled {case.name} in {time.perf_counter() - start:.1f}s")
    result.append(Benchmark(case.name, run))
  return result


def measure(rounds: int, *, quick: bool = False, log: Callable[[str], None] = print
            ) -> tuple[dict, dict[str, list[float]]]:
  """One run in this process: the calibration microbenchmarks (`quick`: fewer sizes and profiles) and every
  case's train step, timed in the same interleaved rounds; (calibration record, step seconds per case and
  round)."""
  benchmarks = calibrate.benchmarks(quick=quick) + step_benchmarks(log=log)
  times = calibrate.time_rounds(benchmarks, rounds, log)
  steps = {case.name: times.pop(case.name) for case in CASES}
  return calibrate.fit(times), steps


def measure_in_subprocess(calibration_path: str, steps_path: str, rounds: int, *, quick: bool = False,
                          log: Callable[[str], None] = print) -> None:
  """`measure` in a fresh process (`python -m pangu.sim measure`) with its own XLA_FLAGS for 8 host devices:
  nothing of this process (compiled executables, caches, allocator state) reaches that run."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "PYTHONPATH": os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
  command = [sys.executable, "-m", "pangu.sim", "measure", f"--out={calibration_path}", f"--steps_out={steps_path}",
             f"--rounds={rounds}"] + (["--quick"] if quick else [])
  log("measuring in another process: " + " ".join(command[1:]))
  subprocess.run(command, env=env, cwd=root, check=True)


def save_measurements(times: dict[str, list[float]], path: str = DEFAULT_PATH,
                      command: str = "python -m experiments.simulate_ascend --measure") -> str:
  import jax
  record = {"command": command, "cpu_count": os.cpu_count(), "pid": os.getpid(),
            "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "step_seconds": times}
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  return path


def load_measurements(path: str = DEFAULT_PATH) -> dict[str, list[float]]:
  with open(path) as f:
    return json.load(f)["step_seconds"]


def predict(case: ValidationCase, calibration: Calibration) -> float:
  """Simulated step seconds of a case on the calibrated CPU topology."""
  shape, plan, workload = case.to_sim()
  return simulate_training(shape, plan, workload, calibration.topology, FP32, calibration.options).step_seconds


def compare(times: dict[str, list[float]], calibration: Calibration,
            cases: tuple[ValidationCase, ...] = CASES) -> dict:
  """Spearman rank correlation and mean absolute percentage error of predicted vs measured step times.

  A config's measured step is the best of its rounds (`calibrate.best_of`, the statistic the calibration's
  benchmarks use, so both describe the least disturbed machine); the median is kept beside it. How far the
  noise of the shared machine reaches: each config's interquartile range over rounds, their median relative
  to the median step (`median_relative_iqr`), and the Spearman correlation of each round's times alone
  (`round_spearman`: the rounds are interleaved, so each is one snapshot of every config).
  """
  rows = []
  for case in cases:
    if case.name not in times:
      continue
    measured = calibrate.best_of(times[case.name])
    predicted = predict(case, calibration)
    spread = np.percentile(times[case.name], [25, 75])
    rows.append({"name": case.name, "measured_s": measured, "measured_median_s": float(np.median(times[case.name])),
                 "predicted_s": predicted, "error": predicted / measured - 1,
                 "measured_iqr_s": [float(v) for v in spread]})
  measured = np.array([row["measured_s"] for row in rows])
  predicted = np.array([row["predicted_s"] for row in rows])
  rounds = min(len(times[row["name"]]) for row in rows)
  per_round = [scipy.stats.spearmanr([times[row["name"]][r] for row in rows], predicted).statistic
               for r in range(rounds)]
  return {"spearman": float(scipy.stats.spearmanr(measured, predicted).statistic),
          "mape": float(np.mean(np.abs(predicted / measured - 1))), "n_configs": len(rows),
          "median_relative_iqr": float(np.median([np.diff(row["measured_iqr_s"])[0] / row["measured_median_s"]
                                                  for row in rows])),
          "round_spearman": [float(v) for v in per_round], "configs": rows}


def cross_run(calibration: Calibration, steps: dict[str, list[float]], other_calibration: Calibration,
              other_steps: dict[str, list[float]], cases: tuple[ValidationCase, ...] = CASES) -> dict:
  """Each run's calibration scored on the other run's step times.

  The headline (`spearman`, `mape`, `configs`) is this run's calibration on the other run's steps; `reverse`
  the other way round; `step_drift` the median relative change of a config's measured step between the runs
  (how far the machine itself moved); `prediction_drift` the median relative change of a config's predicted
  step between the two calibrations (how far their constants move where it matters: some constants fitted
  near zero move by large factors without changing any prediction).
  """
  forward, reverse = compare(other_steps, calibration, cases), compare(steps, other_calibration, cases)
  predicted = [abs(predict(c, other_calibration) / predict(c, calibration) - 1) for c in cases]
  drift = [abs(calibrate.best_of(other_steps[c.name]) / calibrate.best_of(steps[c.name]) - 1)
           for c in cases if c.name in steps and c.name in other_steps]
  return {"spearman": forward["spearman"], "mape": forward["mape"], "n_configs": forward["n_configs"],
          "configs": forward["configs"], "reverse": {"spearman": reverse["spearman"], "mape": reverse["mape"]},
          "worst_mape": max(forward["mape"], reverse["mape"]), "step_drift": float(np.median(drift)),
          "prediction_drift": float(np.median(predicted))}
