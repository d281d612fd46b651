"""Pipeline parallelism: layers over stages, the schedule's bubble and the micro-batches held in flight.

p stages, n micro-batches per data-parallel rank and step, v virtual stages (model chunks) per stage.

- 1F1B bubble: (p − 1) / (p − 1 + n) of the step (confirmed: Pangu Ultra §4.1).
- Interleaved 1F1B: a chunk holds 1 / v of the stage, so the fill and drain shrink v-fold:
  (p − 1) / (p − 1 + v·n) (ours: the standard interleaved schedule, Narayanan et al. 2021).
  Pangu Ultra's 30.45% -> 6.8% at p = 8, v = 6 is n = 16: 7 / 23 and 7 / 103.
- Step time: (n + (p − 1) / v) · t, with t one micro-batch's forward and backward on the busiest stage.
- Activations in flight on stage r (Megatron's warm-up counts): min(n, p − r) micro-batches for 1F1B;
  (2 (p − r − 1) + (v − 1) p + 1) / v stage-micro-batches for the interleaved schedule, which is
  p + (p − 1) / v on the first stage (Korthikanti et al. 2022, §4.2.3).

Layer assignment: the layers (MTP modules last) fill pp · vpp chunks of equal slot counts, padded with no-op
layers as the Pangu papers do (Pro MoE: 48 layers + 2 no-op = 50 over 5 x 5 chunks). No-op slots go to the
last stage first, which also carries the output head, then to the first, which carries the embedding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pangu.sim.plan import Infeasible


def bubble_fraction(stages: int, micro_batches: int, virtual_stages: int = 1) -> float:
  """Idle fraction of a step: (p − 1) / (p − 1 + v·n)."""
  if stages < 1 or micro_batches < 1 or virtual_stages < 1:
    raise ValueError(f"stages, micro_batches and virtual_stages must be >= 1, got {stages}, {micro_batches}, "
                     f"{virtual_stages}")
  return (stages - 1) / (stages - 1 + virtual_stages * micro_batches)


def schedule_seconds(stage_seconds: float, stages: int, micro_batches: int, virtual_stages: int = 1) -> float:
  """Step time of n micro-batches whose forward + backward take `stage_seconds` on the busiest stage."""
  return (micro_batches + (stages - 1) / virtual_stages) * stage_seconds


def micro_batches_in_flight(stages: int, micro_batches: int, virtual_stages: int = 1, stage: int = 0) -> float:
  """Stage-micro-batches of activations stage `stage` holds at its peak."""
  if virtual_stages == 1:
    return float(min(micro_batches, stages - stage))
  chunks = 2 * (stages - stage - 1) + (virtual_stages - 1) * stages + 1
  return min(float(micro_batches), chunks / virtual_stages)


def padded_layers(layers: int, stages: int, virtual_stages: int, max_noop: int) -> int:
  """The smallest multiple of pp · vpp that holds `layers`; Infeasible if it needs more than `max_noop` no-ops."""
  chunks = stages * virtual_stages
  padded = math.ceil(layers / chunks) * chunks
  if padded - layers > max_noop:
    raise Infeasible("layers", f"pp x vpp = {chunks} needs {padded - layers} no-op layers to split {layers} layers "
                     f"(at most {max_noop} allowed)")
  return padded


def stage_layers(layer_kinds: Sequence[str], stages: int, slots_per_stage: int) -> list[list[str]]:
  """Consecutive layers per stage, `slots_per_stage` slots each; no-op slots on the last stage, then the first,
  then from the back."""
  noop = stages * slots_per_stage - len(layer_kinds)
  if noop < 0:
    raise ValueError(f"{len(layer_kinds)} layers do not fit {stages} stages of {slots_per_stage} slots")
  real = [slots_per_stage] * stages
  order = [stages - 1, 0] + list(range(stages - 2, 0, -1)) if stages > 1 else [0]
  while noop:
    for stage in order:
      if noop and real[stage] > 0:
        real[stage] -= 1
        noop -= 1
  result, start = [], 0
  for count in real:
    result.append(list(layer_kinds[start:start + count]))
    start += count
  return result
