"""The programmatic teacher: step-by-step (slow) traces and direct (fast) answers for `pangu.reason.tasks`.

Spec 3a: the teacher draws m candidates that vary in verbosity (a restatement of the task before the steps, a
closing restatement after them), and each step is wrong with probability q_err, the error carried into the
steps after it, so that rejection sampling (`pangu.reason.distill.shortest_correct`) has wrong and long
candidates to reject. A trace is steps joined by `tasks.STEP_SEPARATOR`, the format `tasks.check_steps` reads:
  arith  '3*2=6;1+6=7'        list / string  'sort=1 2 3;rev=3 2 1'        code  'f(1)=4;f(2)=7'
"""

import dataclasses

import numpy as np

from pangu.reason import tasks
from pangu.reason.tasks import STEP_SEPARATOR, Task


@dataclasses.dataclass(frozen=True)
class Solution:
  """A teacher (or student) response: the reasoning trace (empty in fast mode) and the final answer."""

  reasoning: str
  answer: str


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """Attributes:
    candidates: m, candidates drawn per task.
    step_error: q_err, the probability that a step's result is wrong.
    restate_probability: chance of each verbosity addition (opening restatement, closing restatement).
  """

  candidates: int = 4
  step_error: float = 0.1
  restate_probability: float = 0.5

  def __post_init__(self):
    if self.candidates < 1:
      raise ValueError(f"TeacherConfig.candidates must be >= 1, got {self.candidates!r}")
    for name in ("step_error", "restate_probability"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"TeacherConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")


def _wrong(value, modulus: int | None):
  """A plausible wrong value of the same kind: a number off by one, a list with its first item changed, a string
  with its first character changed."""
  if isinstance(value, (int, np.integer)):
    return (value + 1) % modulus if modulus else value + 1
  if isinstance(value, list):
    return [(value[0] + 1) % (modulus or 10**9)] + value[1:] if value else [0]
  return ("z" if value[:1] != "z" else "y") + value[1:]


def _steps(task: Task, errors: np.ndarray | None) -> tuple[list[str], str]:
  """(step texts, final answer); errors[i] corrupts step i."""
  corrupt = None if errors is None else (lambda i, v: _wrong(v, task.modulus) if errors[i] else v)
  if task.family == "arith":
    steps = tasks.arith_steps(task.prompt, task.modulus, corrupt)
    return [f"{x}{op}{y}={z}" for x, op, y, z in steps], str(steps[-1][3])
  if task.family in ("list", "string"):
    steps = tasks.chain_steps(task, corrupt)
    return [f"{name}={value}" for name, value in steps], steps[-1][1]
  if task.family == "code":
    texts = [f"f({x})={_wrong(y, None) if errors is not None and errors[i] else y}"
             for i, (x, y) in enumerate(task.tests)]
    return texts, task.answer
  raise ValueError(f"the teacher cannot solve family {task.family!r}")


def step_count(task: Task) -> int:
  return len(_steps(task, None)[0])


def slow(task: Task) -> Solution:
  """The canonical step-by-step solution: every step right, no restatements."""
  steps, answer = _steps(task, None)
  return Solution(STEP_SEPARATOR.join(steps), answer)


def fast(task: Task) -> Solution:
  """The direct answer, with an empty reasoning span."""
  return Solution("", _steps(task, None)[1])


def _trace(task: Task, errors: np.ndarray | None, opening: bool, closing: bool) -> Solution:
  """A slow solution with the optional opening restatement of the task and closing restatement of the answer."""
  steps, answer = _steps(task, errors)
  steps = [f"task {task.prompt}"] * opening + steps + [f"so {answer}"] * closing
  return Solution(STEP_SEPARATOR.join(steps), answer)


def verbose(task: Task) -> Solution:
  """The longest correct candidate the teacher can write (both restatements): the shortest-correct pick returns
  it whenever every shorter candidate has a wrong step, so reply length limits must leave room for it."""
  return _trace(task, None, True, True)


def candidates(task: Task, rng: np.random.Generator, config: TeacherConfig = TeacherConfig()) -> list[Solution]:
  """m slow candidates of varying verbosity, each step wrong with probability q_err (carried forward)."""
  out = []
  for _ in range(config.candidates):
    errors = rng.random(step_count(task)) < config.step_error
    opening, closing = (rng.random() < config.restate_probability for _ in range(2))
    out.append(_trace(task, errors, opening, closing))
  return out
