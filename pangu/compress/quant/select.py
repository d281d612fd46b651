"""A PTQ method's free settings picked on calibration data.

The paper fixes HTG's parts but not every constant a small model needs: the EMA factor of the channel scale
(alpha = 0.99 in its ablation, on DiT-XL), what to do with the post-GELU fc2 input (unstated) and whether the
folded shift's bias term uses the float or the rounded kernel (unstated). The SmoothQuant-style baseline has its own
free settings, its migration strength (tuned per model in its paper) and the inputs it smooths; a baseline left at
its defaults while HTG is tuned would not be a like-for-like comparison, so both go through the same search.
HTG's own split against the weights (Eq. 7) is SmoothQuant's at migration strength 1/2; searching it over the
baseline's grid (our extension) leaves the timestep-aware parts as the only difference between the two.
Rather than fixing them by the evaluation, `select_ptq` quantises the model with each candidate setting and keeps
the one whose quantised model scores best on a calibration split (the caller's score: e.g. the paired MSE of
samples against the float model from the calibration noise and labels, disjoint from the evaluation's).

Scoring is the search's cost (one quantised sampler pass per candidate), so the search is successive halving
(Jamieson & Talwalkar, 2016): every candidate is scored on a small part of the split, and only the best of them
on more of it. Settings far from the best are told apart on little data; the close ones get the full score.
"""

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

from pangu.compress.quant.calibration import Moments, Stats
from pangu.compress.quant.ptq import PTQConfig, quantise_dit
from pangu.models.dit import BLOCK_LINEARS, DiTConfig

# (quantised params, quant collection, budget) -> a score to minimise on the calibration split; budget: how much of
# the split to score on, in the caller's unit (e.g. trajectories).
Score = Callable[[dict, dict, int], float]
# The post-GELU fc2 input's handling is unstated in the paper: both grids also try leaving it unsmoothed.
ALL_BUT_FC2 = ("qkv", "proj", "fc1")


def htg_candidates(base: PTQConfig, alphas: Sequence[float] = (0.0, 0.9, 0.99),
                   scaled_layers: Sequence[tuple[str, ...]] = (BLOCK_LINEARS, ALL_BUT_FC2),
                   shift_compensations: Sequence[str] = ("quantised", "float")) -> list[PTQConfig]:
  """`base` (method htg) over a grid of its HTG settings: EMA factors, sets of scaled linears (all four, or all
  but fc2) and the kernel the shift's bias term is folded onto. 12 candidates by default."""
  _check_method(base, "htg_candidates", ("htg",))
  return [dataclasses.replace(base, htg=dataclasses.replace(base.htg, alpha=alpha, scaled_layers=tuple(layers),
                                                            shift_compensation=compensation))
          for alpha, layers, compensation in itertools.product(alphas, scaled_layers, shift_compensations)]


MIGRATIONS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # around SmoothQuant's default 1/2


def migration_candidates(base: PTQConfig, migrations: Sequence[float] = MIGRATIONS,
                         scaled_layers: Sequence[tuple[str, ...]] = (BLOCK_LINEARS, ALL_BUT_FC2)
                         ) -> list[PTQConfig]:
  """`base` (method smoothquant, or htg with R1's weight split) over a grid of migration strengths and the same sets
  of smoothed linears as HTG's grid: 12 candidates by default, as many as `htg_candidates`. For HTG this opens
  the exponent Eq. 7 fixes at 1/2 (our extension): with the same grid as SmoothQuant-style's, the two differ only
  in HTG's timestep-aware parts (per-group shift, EMA scale, per-group ranges)."""
  _check_method(base, "migration_candidates", ("smoothquant", "htg"))
  sub = getattr(base, base.method)
  return [dataclasses.replace(base, **{base.method: dataclasses.replace(sub, migration=migration,
                                                                        scaled_layers=tuple(layers))})
          for migration, layers in itertools.product(migrations, scaled_layers)]


@dataclasses.dataclass(frozen=True)
class Search:
  """A configuration whose open settings are searched: the method it quantises with and its grid of candidates
  around that method's base configuration."""

  method: str
  candidates: Callable[[PTQConfig], list[PTQConfig]]


# The configurations with open settings to search, by name: HTG over its paper-open constants (Eq. 7's split at
# 1/2), SmoothQuant-style over its migration strength, and HTG over the same migration grid (`htg_migration`).
SEARCHES: dict[str, Search] = {"htg": Search("htg", htg_candidates),
                               "smoothquant": Search("smoothquant", migration_candidates),
                               "htg_migration": Search("htg", migration_candidates)}


def _check_method(base: PTQConfig, grid: str, methods: tuple[str, ...]) -> None:
  if base.method not in methods:
    raise ValueError(f"{grid} varies the {' or '.join(methods)} settings, but the base PTQConfig's method is "
                     f"{base.method!r}")


def select_ptq(config: DiTConfig, params: dict, stats: Stats, candidates: Sequence[PTQConfig], score: Score,
               budgets: Sequence[int], reduction: int = 4,
               moments: Moments | None = None) -> tuple[PTQConfig, list[dict[int, float]]]:
  """(the pick, each candidate's scores {budget: score} at the budgets it reached).

  Successive halving: every candidate is scored at budgets[0]; the best ceil(n / reduction) of the n scored at a
  budget go on to the next, and the pick is the best at the last budget reached. Ties go to the earlier
  candidate. One budget is a plain grid search. `stats` (and `moments`, for GPTQ's weight rounding): the float
  model's calibration stats, as `quantise_dit` takes them.
  """
  if not candidates:
    raise ValueError("select_ptq needs at least one candidate")
  if not budgets or budgets[0] < 1 or any(b <= a for a, b in zip(budgets, budgets[1:])):
    raise ValueError(f"budgets must be positive and increasing, got {tuple(budgets)}")
  if reduction < 2 and len(budgets) > 1:
    raise ValueError(f"reduction must be at least 2 to halve between budgets, got {reduction}")
  scores: list[dict[int, float]] = [{} for _ in candidates]
  alive = list(range(len(candidates)))
  for rung, budget in enumerate(budgets):
    for i in alive:
      qparams, quant, _ = quantise_dit(config, params, stats, candidates[i], moments=moments)
      scores[i][budget] = float(score(qparams, quant, budget))
    alive = sorted(alive, key=lambda i: scores[i][budget])  # stable: ties keep the earlier candidate first
    if rung < len(budgets) - 1:
      alive = sorted(alive[:math.ceil(len(alive) / reduction)])
  return candidates[alive[0]], scores
