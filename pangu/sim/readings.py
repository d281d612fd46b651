"""Readings of a reported layout: its MFU under every combination of the assumptions its sources leave open.

Pangu Ultra MoE reports 30.0% MFU (confirmed) for TP8 / PP16 / VPP2 / EP4 (secondary) but not the global batch
(so the micro-batches per pipeline), whether the EP exchange hides under compute (Adaptive Pipe Overlap), how
TP and EP combine, or its recomputation. Each `Assumption` lists its readings as changes to the plan (any
`Plan` field) or to the workload (`global_batch`); `readings` simulates every combination, and `effects` says
which assumption moves the MFU most: per assumption, the median MFU of each of its readings over all
combinations of the others, and the spread between them.

A combination that does not fit device memory keeps the MFU it would reach with the memory (`fits` False and
the reason), since the papers' tensor swapping and fine-grained recomputation, which we do not model, are
exactly what makes such layouts fit.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from pangu.parallel.topology import Topology
from pangu.sim.plan import MIXED_BF16, Infeasible, Plan, Precision, TrainWorkload
from pangu.sim.shapes import ModelShape
from pangu.sim.training import SimOptions, simulate_training

WORKLOAD_FIELDS = ("global_batch",)


@dataclasses.dataclass(frozen=True)
class Assumption:
  """One unstated assumption and its readings: (label, changes) pairs, changes to `Plan` fields or to
  `global_batch`."""

  name: str
  readings: tuple[tuple[str, tuple[tuple[str, object], ...]], ...]

  def __post_init__(self):
    if len(self.readings) < 2:
      raise ValueError(f"Assumption.readings of {self.name!r} needs at least two readings, got {self.readings!r}")
    fields = {f.name for f in dataclasses.fields(Plan)} | set(WORKLOAD_FIELDS)
    for label, changes in self.readings:
      unknown = [key for key, _ in changes if key not in fields]
      if unknown:
        raise ValueError(f"Assumption.readings of {self.name!r}: {label!r} changes unknown fields {unknown}")


def assumption(name: str, **readings: dict) -> Assumption:
  """`assumption("overlap", hidden={"ep_overlap": True}, exposed={"ep_overlap": False})`."""
  return Assumption(name, tuple((label, tuple(changes.items())) for label, changes in readings.items()))


def _unlimited(topology: Topology) -> Topology:
  return dataclasses.replace(topology, device=dataclasses.replace(topology.device, hbm_bytes=math.inf))


def reading(shape: ModelShape, plan: Plan, workload: TrainWorkload, topology: Topology,
            precision: Precision = MIXED_BF16, options: SimOptions = SimOptions()) -> dict:
  """One combination: MFU, step, bubble and memory; over memory it is simulated with unlimited memory and marked
  `fits` False with the reason; any other infeasibility gives only the reason."""
  try:
    estimate, fits, reason = simulate_training(shape, plan, workload, topology, precision, options), True, None
  except Infeasible as error:
    if error.kind != "memory":
      return {"plan": plan.describe(), "fits": False, "reason": error.reason, "mfu": None}
    estimate = simulate_training(shape, plan, workload, _unlimited(topology), precision, options)
    fits, reason = False, error.reason
  return {"plan": plan.describe(), "global_batch": workload.global_batch, "micro_batches": estimate.micro_batches,
          "mfu": estimate.mfu, "step_s": estimate.step_seconds, "bubble": estimate.bubble,
          "memory_gib": estimate.memory.total / 2**30, "fits": fits, "reason": reason}


def readings(shape: ModelShape, plan: Plan, workload: TrainWorkload, topology: Topology,
             assumptions: tuple[Assumption, ...], precision: Precision = MIXED_BF16,
             options: SimOptions = SimOptions()) -> list[dict]:
  """Every combination of the assumptions' readings applied to (plan, workload), each with its labels under
  `readings` ({assumption name: label})."""
  rows = []
  for combination in itertools.product(*(a.readings for a in assumptions)):
    changes = dict(item for _, change in combination for item in change)
    batch = changes.pop("global_batch", workload.global_batch)
    row = reading(shape, plan.replace(**changes), dataclasses.replace(workload, global_batch=batch), topology,
                  precision, options)
    rows.append({"readings": {a.name: label for a, (label, _) in zip(assumptions, combination)}, **row})
  return rows


def effects(rows: list[dict], assumptions: tuple[Assumption, ...]) -> dict:
  """Per assumption: the median MFU of each reading over the combinations of the others (those simulated), and
  the spread (largest − smallest of those medians); `driver` is the assumption with the largest spread."""
  result = {}
  for a in assumptions:
    medians = {}
    for label, _ in a.readings:
      values = [row["mfu"] for row in rows if row["readings"][a.name] == label and row["mfu"] is not None]
      medians[label] = float(np.median(values)) if values else None
    known = [v for v in medians.values() if v is not None]
    result[a.name] = {"median_mfu": medians, "spread": max(known) - min(known) if known else 0.0}
  driver = max(result, key=lambda name: result[name]["spread"])
  return {"by_assumption": result, "driver": driver}
