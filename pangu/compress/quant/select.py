"""HTG's free settings picked on calibration data.

The paper fixes the method's parts but not every constant a small model needs: the EMA factor of the channel
scale (alpha = 0.99 in its ablation, on DiT-XL), what to do with the post-GELU fc2 input (unstated) and whether
the folded shift's bias term uses the float or the rounded kernel (unstated). Rather than fixing them by the
evaluation, `select_htg` quantises the model with each candidate setting and keeps the one whose quantised model
scores best on a calibration split (the caller's score: e.g. the paired MSE of samples against the float model
from the calibration noise and labels, disjoint from the evaluation's).

Scoring is the search's cost (one quantised sampler pass per candidate), so the search is successive halving
(Jamieson & Talwalkar, 2016): every candidate is scored on a small part of the split, and only the best of them
on more of it. Settings far from the best are told apart on little data; the close ones get the full score.
"""

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

from pangu.compress.quant.calibration import Stats
from pangu.compress.quant.ptq import PTQConfig, quantise_dit
from pangu.compress.quant.smoothing import HTGConfig
from pangu.models.dit import BLOCK_LINEARS, DiTConfig

# (quantised params, quant collection, budget) -> a score to minimise on the calibration split; budget: how much of
# the split to score on, in the caller's unit (e.g. trajectories).
Score = Callable[[dict, dict, int], float]


def htg_candidates(base: HTGConfig, alphas: Sequence[float] = (0.0, 0.9, 0.99),
                   scaled_layers: Sequence[tuple[str, ...]] = (BLOCK_LINEARS, ("qkv", "proj", "fc1")),
                   shift_compensations: Sequence[str] = ("quantised", "float")) -> list[HTGConfig]:
  """The grid of `base` over EMA factors, sets of scaled linears (all four, or all but fc2) and the kernel the
  shift's bias term is folded onto."""
  return [dataclasses.replace(base, alpha=alpha, scaled_layers=tuple(layers), shift_compensation=compensation)
          for alpha, layers, compensation in itertools.product(alphas, scaled_layers, shift_compensations)]


def select_htg(config: DiTConfig, params: dict, stats: Stats, ptq: PTQConfig, candidates: Sequence[HTGConfig],
               score: Score, budgets: Sequence[int], reduction: int = 4) -> tuple[HTGConfig, list[dict[int, float]]]:
  """(the pick, each candidate's scores {budget: score} at the budgets it reached).

  Successive halving: every candidate is scored at budgets[0]; the best ceil(n / reduction) of the n scored at a
  budget go on to the next, and the pick is the best at the last budget reached. Ties go to the earlier
  candidate. One budget is a plain grid search. `stats`: the float model's calibration stats, as `quantise_dit`
  takes them.
  """
  if ptq.method != "htg" or not candidates:
    raise ValueError(f"select_htg needs method 'htg' and candidates, got {ptq.method!r} and {len(candidates)}")
  if not budgets or budgets[0] < 1 or any(b <= a for a, b in zip(budgets, budgets[1:])):
    raise ValueError(f"budgets must be positive and increasing, got {tuple(budgets)}")
  if reduction < 2 and len(budgets) > 1:
    raise ValueError(f"reduction must be at least 2 to halve between budgets, got {reduction}")
  scores: list[dict[int, float]] = [{} for _ in candidates]
  alive = list(range(len(candidates)))
  for rung, budget in enumerate(budgets):
    for i in alive:
      qparams, quant, _ = quantise_dit(config, params, stats, dataclasses.replace(ptq, htg=candidates[i]))
      scores[i][budget] = float(score(qparams, quant, budget))
    alive = sorted(alive, key=lambda i: scores[i][budget])  # stable: ties keep the earlier candidate first
    if rung < len(budgets) - 1:
      alive = sorted(alive[:math.ceil(len(alive) / reduction)])
  return candidates[alive[0]], scores
