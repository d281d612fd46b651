"""MARS, the Multi-source Adaptive Reward System of Pangu Embedded (spec 3e).

Every rollout gets one scalar reward from the source that fits its task, plus penalties shared by all tasks:

  r = clip(r_task - repetition_weight * rep(y) - format_weight * fmt(y), -1, 1)

Sources, each in [0, 1]:
- math: the last `\\boxed{}` of the answer (never of the reasoning) against the gold answer. Both integers or
  exact rationals (including finite decimals) compare exactly; otherwise math-verify's `verify(parse(gold),
  parse(pred))`, gold first (its numeric tolerance and relation handling are not symmetric in general).
  A parse failure is inconclusive and falls back to the evaluator; a timeout or exception scores 0.
- exact: the answer (its last `\\boxed{}` when it has one) against the gold text after collapsing whitespace;
  for tasks whose answer is a string with one spelling (lists, strings, user data of the `exact` family).
- code: the answer's last fenced code block, run against the task's unit tests by `pangu.reason.sandbox.run_code`;
  the fraction of tests passed (or 1 only when all pass, `binary_code`).
- general: an evaluator model, any `Evaluator` callable `(prompt, response) -> score`, with r = sigmoid(score);
  `DecoderJudge` is the small default built on a pangu decoder.

"Adaptive" is our documented reading of the paper (which gives no formula): with `combination="route"` (default)
each sample is scored by the most reliable source that can decide it: a deterministic verifier where one applies
and is conclusive, the evaluator only where none is (general tasks, unparsable maths). `combination="weighted_sum"`
is the static ablation, `sum_s w_s r_s / sum_s w_s` over every source that applies to the sample (like EasyDeL's
`reward_weights`).

A failing source never crashes the learner: each call runs under a wall-clock guard, and an exception or timeout
yields `failure_reward` with the reason logged and returned.
"""

import dataclasses
import fractions
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from pangu.data.tokenizer import Tokenizer
from pangu.models.config import TransformerConfig
from pangu.models.transformer import Decoder
from pangu.reason.sandbox import WALL_CLOCK_SLACK_S, run_code

logger = logging.getLogger(__name__)

TaskType = Literal["math", "exact", "code", "general"]
Mode = Literal["slow", "fast"]
# (prompt, response) -> an unbounded score; the reward is its sigmoid.
Evaluator = Callable[[str, str], float]

SOURCES = ("math", "exact", "code", "judge")
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_RATIONAL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(/\d+)?$")
_LATEX_FRACTION = re.compile(r"^([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{(\d+)\}$")


@dataclasses.dataclass(frozen=True)
class SourceScore:
  """One source's verdict: score in [0, 1]; verified when a deterministic check decided it."""
  score: float
  verified: bool
  reason: str


@dataclasses.dataclass(frozen=True)
class RewardRequest:
  """A rollout to score. `answer` is the text after the reasoning span; `thinking` the reasoning (None: absent).

  `gold` is the maths answer (the content of its `\\boxed{}`), `tests` the code task's unit-test snippets,
  `tokens` the generated ids (for the repetition check), `closed` whether the reasoning span was closed.
  """
  task: TaskType
  prompt: str
  answer: str
  mode: Mode = "slow"
  thinking: str | None = None
  closed: bool = True
  gold: str | None = None
  tests: tuple[str, ...] = ()
  tokens: tuple[int, ...] = ()

  def __post_init__(self):
    if self.task not in ("math", "exact", "code", "general"):
      raise ValueError(f"RewardRequest.task must be math, exact, code or general, got {self.task!r}")
    if self.mode not in ("slow", "fast"):
      raise ValueError(f"RewardRequest.mode must be slow or fast, got {self.mode!r}")
    if self.task in ("math", "exact") and self.gold is None:
      raise ValueError(f"RewardRequest.gold is required for task={self.task!r}")
    if self.task == "code" and not self.tests:
      raise ValueError("RewardRequest.tests must be non-empty for a code task")
    object.__setattr__(self, "tests", tuple(self.tests))
    object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))


@dataclasses.dataclass(frozen=True)
class MARSConfig:
  """How MARS combines its sources.

  Attributes:
    combination: "route" (adaptive: the deciding source per sample) or "weighted_sum" (static ablation).
    math_weight, exact_weight, code_weight, judge_weight: the source weights of "weighted_sum".
    repetition_weight, format_weight: penalty sizes (spec 3e: 0.5 each).
    repetition_min_n, repetition_max_n, repetition_repeats: rep(y)=1 when an n-gram, min_n <= n <= max_n tokens,
      repeats this many times in a row.
    binary_code: code reward 1 only when every test passes, else passed/total.
    code_time_limit_s, code_memory_mb: sandbox limits per candidate.
    source_timeout_s: wall-clock guard on the math and judge sources.
    failure_reward: the task reward when a source crashes or times out.
  """
  combination: Literal["route", "weighted_sum"] = "route"
  math_weight: float = 1.0
  exact_weight: float = 1.0
  code_weight: float = 1.0
  judge_weight: float = 0.5
  repetition_weight: float = 0.5
  format_weight: float = 0.5
  repetition_min_n: int = 4
  repetition_max_n: int = 32
  repetition_repeats: int = 3
  binary_code: bool = False
  code_time_limit_s: float = 2.0
  code_memory_mb: int = 256
  source_timeout_s: float = 10.0
  failure_reward: float = 0.0

  def __post_init__(self):
    if self.combination not in ("route", "weighted_sum"):
      raise ValueError(f"MARSConfig.combination must be route or weighted_sum, got {self.combination!r}")
    for name in ("math_weight", "exact_weight", "code_weight", "judge_weight", "repetition_weight", "format_weight",
                 "source_timeout_s", "code_time_limit_s"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"MARSConfig.{name} must be >= 0, got {getattr(self, name)}")
    if not 1 <= self.repetition_min_n <= self.repetition_max_n or self.repetition_repeats < 2:
      raise ValueError(f"MARSConfig repetition n-gram range ({self.repetition_min_n}, {self.repetition_max_n}) must "
                       f"satisfy 1 <= min <= max and repetition_repeats={self.repetition_repeats} must be >= 2")
    if not -1 <= self.failure_reward <= 1:
      raise ValueError(f"MARSConfig.failure_reward must be in [-1, 1], got {self.failure_reward}")


@dataclasses.dataclass(frozen=True)
class MARSReward:
  """The final reward, the task reward before penalties, the penalties and every reason on the way."""
  reward: float
  task_reward: float
  source: str
  verified: bool
  repetition: bool
  format_error: str | None
  reason: str


def last_boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in text, braces balanced; None when absent."""
  start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
  if start < 0:
    return None
  depth, begin = 0, text.index("{", start)
  for index in range(begin, len(text)):
    depth += {"{": 1, "}": -1}.get(text[index], 0)
    if depth == 0:
      return text[begin + 1:index].strip()
  return None


def exact_rational(text: str) -> fractions.Fraction | None:
  """An integer, finite decimal, a/b or \\frac{a}{b} as an exact Fraction; None for anything else."""
  compact = text.replace(" ", "").replace("{,}", "").strip("$")
  latex = _LATEX_FRACTION.match(compact)
  if latex:
    sign, numerator, denominator = latex.groups()
    compact = f"{sign}{numerator}/{denominator}"
  if not _RATIONAL.match(compact):
    return None
  try:
    return fractions.Fraction(compact)
  except (ValueError, ZeroDivisionError):
    return None


def math_score(answer: str, gold: str) -> SourceScore | None:
  """The maths verdict of `answer`'s last `\\boxed{}` against `gold`; None when inconclusive (unparsable).

  Runs math-verify without its own signal-based timeout (which works only on the main thread); the caller's
  guard bounds the time instead.
  """
  from math_verify import parse, verify  # heavy import (sympy, antlr), paid by the first maths reward
  predicted = last_boxed(answer)
  if predicted is None:
    return SourceScore(0.0, True, "no \\boxed{} in the answer")
  gold_text = last_boxed(gold) or gold
  gold_exact, predicted_exact = exact_rational(gold_text), exact_rational(predicted)
  if gold_exact is not None and predicted_exact is not None:
    equal = gold_exact == predicted_exact
    return SourceScore(float(equal), True, f"exact rational comparison: {'equal' if equal else 'different'}")
  gold_parsed = parse(f"${gold_text}$", parsing_timeout=None)
  predicted_parsed = parse(f"${predicted}$", parsing_timeout=None)
  if len(gold_parsed) < 2 or len(predicted_parsed) < 2:  # [expression, text] when parsed; [] or [text] when not
    return None
  equal = verify(gold_parsed, predicted_parsed, timeout_seconds=None)
  return SourceScore(float(equal), True, f"math-verify: {'equivalent' if equal else 'not equivalent'}")


def exact_score(answer: str, gold: str) -> SourceScore:
  """Exact match of the answer (its last `\\boxed{}` when present) with the gold text, whitespace collapsed."""
  predicted = last_boxed(answer)
  predicted = answer if predicted is None else predicted
  equal = " ".join(predicted.split()) == " ".join(gold.split())
  return SourceScore(float(equal), True, f"exact match: {'equal' if equal else 'different'}")


def extract_code(answer: str) -> str | None:
  """The last fenced code block of the answer (``` or ```python); None when there is none."""
  blocks = _CODE_BLOCK.findall(answer)
  return blocks[-1] if blocks else None


def code_score(answer: str, tests: Sequence[str], config: MARSConfig) -> SourceScore:
  """The sandboxed test pass rate of the answer's code block."""
  source = extract_code(answer)
  if source is None:
    return SourceScore(0.0, True, "no code block in the answer")
  result = run_code(source, tests, time_limit_s=config.code_time_limit_s, memory_mb=config.code_memory_mb)
  score = float(result.passed == result.total) if config.binary_code else result.fraction
  return SourceScore(score, True, f"sandbox: {result.passed}/{result.total} tests passed ({result.reason})")


def has_repetition(tokens: Sequence[int], *, min_n: int = 4, max_n: int = 32, repeats: int = 3) -> bool:
  """Whether some n-gram, min_n <= n <= max_n, occurs `repeats` times in a row.

  An n-gram repeats r times in a row exactly when tokens[j] == tokens[j + n] for (r - 1) * n consecutive j.
  """
  ids = np.asarray(tokens)
  for n in range(min_n, max_n + 1):
    run_needed = (repeats - 1) * n
    if len(ids) < n + run_needed:
      break
    equal = np.concatenate([[False], ids[:-n] == ids[n:], [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(equal))
    if len(edges) and (edges[1::2] - edges[0::2]).max() >= run_needed:
      return True
  return False


def format_error(request: RewardRequest) -> str | None:
  """Why the output breaks its task's format (spec 3e fmt(y)), or None when it is well formed."""
  if request.mode == "slow" and not request.closed:
    return "slow output never closes its reasoning"
  if request.mode == "slow" and not request.answer.strip():
    return "slow output has an empty answer"
  if request.mode == "fast" and request.thinking:
    return "fast output has a reasoning span"
  if request.task == "math" and last_boxed(request.answer) is None:
    return "maths answer lacks \\boxed{}"
  if request.task == "code" and extract_code(request.answer) is None:
    return "code answer lacks a code block"
  return None


class DecoderJudge:
  """The small default evaluator: a pangu decoder reading `prompt SEP response` and comparing two token logits.

  score = logit[good_token] - logit[bad_token] at the last position, so r = sigmoid(score) is the judge's
  probability of "good" restricted to the two verdict tokens. Train it as a next-token classifier on teacher-good
  vs corrupted responses followed by the verdict token.
  """

  def __init__(self, config: TransformerConfig, params: Any, tokenizer: Tokenizer, *, good_token: int,
               bad_token: int, separator: str = "\n###\n", max_tokens: int = 512):
    for name, token in (("good_token", good_token), ("bad_token", bad_token)):
      if not 0 <= token < config.vocab_size:
        raise ValueError(f"DecoderJudge.{name}={token} is outside the vocabulary of {config.vocab_size}")
    self.tokenizer, self.separator, self.max_tokens = tokenizer, separator, max_tokens
    decoder = Decoder(config)

    @jax.jit
    def margin(tokens):
      logits = decoder.apply({"params": params}, tokens[None])[0, -1]
      return logits[good_token] - logits[bad_token]

    self._margin = margin

  def judge_tokens(self, prompt: str, response: str) -> np.ndarray:
    """The judge's input ids; an input longer than max_tokens is an error, not silently cut."""
    tokens = self.tokenizer.encode(prompt + self.separator + response)
    if len(tokens) > self.max_tokens:
      raise ValueError(f"judge input has {len(tokens)} tokens, over max_tokens={self.max_tokens}")
    return np.asarray(tokens, np.int32)

  def __call__(self, prompt: str, response: str) -> float:
    return float(self._margin(jnp.asarray(self.judge_tokens(prompt, response))))


def _guarded(name: str, fn: Callable[[], Any], timeout_s: float) -> tuple[Any, str | None]:
  """Runs fn on a daemon thread with a wall-clock bound: (value, None), or (None, why it failed)."""
  box: dict[str, Any] = {}

  def target():
    try:
      box["value"] = fn()
    except Exception as error:  # any source bug becomes a reason, never a learner crash
      box["error"] = f"{type(error).__name__}: {error}"

  worker = threading.Thread(target=target, name=f"mars-{name}", daemon=True)
  worker.start()
  worker.join(timeout_s)
  if worker.is_alive():
    return None, f"{name} timed out after {timeout_s:.1f} s"
  if "error" in box:
    return None, f"{name} failed: {box['error']}"
  return box["value"], None


class MARS:
  """Scores rollouts (see the module docstring); the evaluator is optional where no task needs it."""

  def __init__(self, config: MARSConfig = MARSConfig(), evaluator: Evaluator | None = None):
    self.config, self.evaluator = config, evaluator

  def _source(self, name: str, request: RewardRequest) -> SourceScore | None:
    """One source's score; None when inconclusive or not applicable; failures become `failure_reward`."""
    config = self.config
    if name == "math":
      fn, timeout_s = (lambda: math_score(request.answer, request.gold)), config.source_timeout_s
    elif name == "exact":
      fn, timeout_s = (lambda: exact_score(request.answer, request.gold)), config.source_timeout_s
    elif name == "code":
      fn = lambda: code_score(request.answer, request.tests, config)  # noqa: E731
      timeout_s = math.ceil(config.code_time_limit_s) + 2 * WALL_CLOCK_SLACK_S + 5.0
    else:
      evaluator = self.evaluator
      fn = lambda: SourceScore(1 / (1 + math.exp(-evaluator(request.prompt, request.answer))), False,  # noqa: E731
                               "evaluator model")
      timeout_s = config.source_timeout_s
    value, failure = _guarded(name, fn, timeout_s)
    if failure is not None:
      logger.warning("MARS reward source failed: %s", failure)
      return SourceScore(config.failure_reward, False, failure)
    return value

  def _applicable(self, request: RewardRequest) -> list[str]:
    names = {"math": ["math"], "exact": ["exact"], "code": ["code"], "general": []}[request.task]
    return names + (["judge"] if self.evaluator is not None else [])

  def _task_reward(self, request: RewardRequest) -> tuple[float, str, bool, str]:
    """(task reward, source, verified, reason) under the configured combination."""
    if self.config.combination == "route":
      reasons = []
      for name in self._applicable(request):
        score = self._source(name, request)
        if score is not None:
          return score.score, name, score.verified, "; ".join(reasons + [score.reason])
        reasons.append(f"{name} inconclusive")
      return self.config.failure_reward, "none", False, "; ".join(reasons + ["no source could score this sample"])
    weights = {name: getattr(self.config, f"{name}_weight") for name in SOURCES}
    scored = [(name, score) for name in self._applicable(request)
              if (score := self._source(name, request)) is not None and weights[name] > 0]
    if not scored:
      return self.config.failure_reward, "none", False, "no source could score this sample"
    total = sum(weights[name] for name, _ in scored)
    value = sum(weights[name] * score.score for name, score in scored) / total
    reason = "; ".join(f"{name}={score.score:.3f} ({score.reason})" for name, score in scored)
    return value, "+".join(name for name, _ in scored), all(s.verified for _, s in scored), reason

  def __call__(self, request: RewardRequest) -> MARSReward:
    config = self.config
    task_reward, source, verified, reason = self._task_reward(request)
    repetition = has_repetition(request.tokens, min_n=config.repetition_min_n, max_n=config.repetition_max_n,
                                repeats=config.repetition_repeats)
    bad_format = format_error(request)
    reward = task_reward - config.repetition_weight * repetition - config.format_weight * (bad_format is not None)
    return MARSReward(reward=float(min(1.0, max(-1.0, reward))), task_reward=float(task_reward), source=source,
                      verified=verified, repetition=repetition, format_error=bad_format, reason=reason)
