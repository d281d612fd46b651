"""HTG's free settings picked on calibration data.

The paper fixes the method's parts but not every constant a small model needs: the EMA factor of the channel
scale (alpha = 0.99 in its ablation, on DiT-XL), what to do with the post-GELU fc2 input (unstated) and whether
the folded shift's bias term uses the float or the rounded kernel (unstated). Rather than fixing them by the
evaluation, `select_htg` quantises the model with each candidate setting and keeps the one whose quantised model
scores best on a calibration split (the caller's score: e.g. the paired MSE of samples against the float model
from the calibration noise and labels, disjoint from the evaluation's).
"""

import dataclasses
import itertools
from collections.abc import Callable, Sequence

from pangu.compress.quant.calibration import Stats
from pangu.compress.quant.ptq import PTQConfig, quantise_dit
from pangu.compress.quant.smoothing import HTGConfig
from pangu.models.dit import BLOCK_LINEARS, DiTConfig

# (quantised params, quant collection) -> a score to minimise on the calibration split.
Score = Callable[[dict, dict], float]


def htg_candidates(base: HTGConfig, alphas: Sequence[float] = (0.0, 0.9, 0.99),
                   scaled_layers: Sequence[tuple[str, ...]] = (BLOCK_LINEARS, ("qkv", "proj", "fc1")),
                   shift_compensations: Sequence[str] = ("quantised", "float")) -> list[HTGConfig]:
  """The grid of `base` over EMA factors, sets of scaled linears (all four, or all but fc2) and the kernel the
  shift's bias term is folded onto."""
  return [dataclasses.replace(base, alpha=alpha, scaled_layers=tuple(layers), shift_compensation=compensation)
          for alpha, layers, compensation in itertools.product(alphas, scaled_layers, shift_compensations)]


def select_htg(config: DiTConfig, params: dict, stats: Stats, ptq: PTQConfig, candidates: Sequence[HTGConfig],
               score: Score) -> tuple[HTGConfig, list[float]]:
  """(the candidate with the lowest score, every candidate's score in order); ties go to the earlier one.
  `stats`: the float model's calibration stats, as `quantise_dit` takes them."""
  if ptq.method != "htg" or not candidates:
    raise ValueError(f"select_htg needs method 'htg' and candidates, got {ptq.method!r} and {len(candidates)}")
  scores = []
  for candidate in candidates:
    qparams, quant, _ = quantise_dit(config, params, stats, dataclasses.replace(ptq, htg=candidate))
    scores.append(float(score(qparams, quant)))
  return candidates[min(range(len(scores)), key=scores.__getitem__)], scores
