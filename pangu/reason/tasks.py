"""Verifiable reasoning tasks with graded difficulty, their verifiers, and the JSONL schema for real data.

Pangu Embedded distils from a teacher and keeps only answers a verifier accepts, so every task here has an exact
answer and a checker (spec 3a). Families, each seeded and graded by `level` 1..5:
  - `arith`: an integer expression; the level is the number of operators. Standard precedence.
  - `list`: a chain of list operations (sort, rev, even, cumsum, dedup) on digits; the level sets list and chain
    length.
  - `string`: a chain of string operations (rev, sortc, dropv, dup, upper) on a short word.
  - `code`: write `f(x)` from a description; checked by running 3-5 unit tests through a restricted AST
    interpreter (no `exec`: a pure checker; the sandboxed runner is `pangu.reason.sandbox`). The reference is
    one line (`def f(x): return ...`, a conditional expression `a if t<x else b` from level 3) without '>', so
    it fits the compact chat format, whose turn ends at a newline and whose reasoning span ends at '>'.
  - `exact`: user data without a generator (`load_jsonl`): the answer must match exactly, no step check.
Verification has two layers: `verify` checks the final answer, `check_steps` recomputes every step of a
step-by-step trace (the teacher's format, `pangu.reason.teacher`).

`TaskConfig.modulus` reduces every number modulo m (arith and list): a toy-scale setting in which each step is a
small lookup a tiny model can learn, while chaining many of them in one pass (fast mode) stays hard.
"""

import ast
import dataclasses
import json
import operator
import re
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np

GENERATED_FAMILIES = ("arith", "list", "string", "code")  # the families `generate` draws; `exact` is user data
FAMILIES = (*GENERATED_FAMILIES, "exact")
LEVELS = (1, 2, 3, 4, 5)
STEP_SEPARATOR = ";"
EMPTY_LIST = "none"

_ARITH_OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_PRECEDENCE = {"+": 0, "-": 0, "*": 1}
_VOWELS = set("aeiouAEIOU")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """How tasks are drawn.

  Attributes:
    modulus: numbers of `arith` and `list` are reduced modulo this (None: exact integers).
    max_operand: operands and list items are drawn from 0..max_operand.
    arith_ops: operators `arith` draws from, a subset of "+-*".
    list_ops, string_ops: operation names the chain families draw from.
  """

  modulus: int | None = None
  max_operand: int = 9
  arith_ops: str = "+-*"
  list_ops: tuple[str, ...] = ("sort", "rev", "even", "cumsum", "dedup")
  string_ops: tuple[str, ...] = ("rev", "sortc", "dropv", "dup", "upper")

  def __post_init__(self):
    if self.modulus is not None and self.modulus < 2:
      raise ValueError(f"TaskConfig.modulus must be None or >= 2, got {self.modulus!r}")
    if self.max_operand < 1:
      raise ValueError(f"TaskConfig.max_operand must be >= 1, got {self.max_operand!r}")
    if not self.arith_ops or set(self.arith_ops) - set(_ARITH_OPS):
      raise ValueError(f"TaskConfig.arith_ops must be a non-empty subset of '+-*', got {self.arith_ops!r}")
    for name, known in (("list_ops", _LIST_OPS), ("string_ops", _STRING_OPS)):
      ops = getattr(self, name)
      if not ops or set(ops) - set(known):
        raise ValueError(f"TaskConfig.{name} must be a non-empty subset of {sorted(known)}, got {ops!r}")


@dataclasses.dataclass(frozen=True)
class Task:
  """One item: what the user asks, the exact answer, and what a verifier needs.

  Attributes:
    family: one of FAMILIES.
    level: difficulty 1..5 (user data may use any positive int).
    prompt: the user turn, without mode switches.
    answer: the reference final answer (for `code`, a reference implementation).
    tests: `code` only: (input, expected output) pairs.
    modulus: the arithmetic the task was drawn with (TaskConfig.modulus).
  """

  family: str
  level: int
  prompt: str
  answer: str
  tests: tuple[tuple[int, int], ...] = ()
  modulus: int | None = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"Task.family must be one of {FAMILIES}, got {self.family!r}")
    if not isinstance(self.level, int) or self.level < 1:
      raise ValueError(f"Task.level must be a positive int, got {self.level!r}")
    if not self.prompt:
      raise ValueError("Task.prompt must not be empty")
    if self.family == "code" and not self.tests:
      raise ValueError("a code Task needs unit tests")


def _reduce(value: int, modulus: int | None) -> int:
  return value % modulus if modulus else value


# ----------------------------------------------------------------------------------------------------------- arith

Corrupt = Callable[[int, object], object]


def arith_steps(prompt: str, modulus: int | None, corrupt: Corrupt | None = None) -> list[tuple[int, str, int, int]]:
  """The reduction of an expression one operator at a time (leftmost of the highest precedence first):
  [(x, op, y, result)]. The teacher writes these steps; the step check recomputes them. `corrupt(i, result)`
  may replace step i's result (the teacher's step errors), which later steps then build on."""
  tokens = re.findall(r"\d+|[+\-*]", prompt)
  values, ops = [int(t) for t in tokens[0::2]], tokens[1::2]
  steps = []
  while ops:
    top = max(_PRECEDENCE[o] for o in ops)
    i = next(i for i, o in enumerate(ops) if _PRECEDENCE[o] == top)
    result = _reduce(_ARITH_OPS[ops[i]](values[i], values[i + 1]), modulus)
    result = corrupt(len(steps), result) if corrupt else result
    steps.append((values[i], ops[i], values[i + 1], result))
    values[i:i + 2], ops[i:i + 1] = [result], []
  return steps


def _arith_task(level: int, rng: np.random.Generator, config: TaskConfig) -> Task:
  values = rng.integers(0, config.max_operand + 1, level + 1)
  ops = rng.choice(list(config.arith_ops), level)
  prompt = str(values[0]) + "".join(f"{o}{v}" for o, v in zip(ops, values[1:]))
  steps = arith_steps(prompt, config.modulus)
  return Task("arith", level, prompt, str(steps[-1][3]), modulus=config.modulus)


# ------------------------------------------------------------------------------------------ list and string chains

def _format_list(items: Sequence[int]) -> str:
  return " ".join(map(str, items)) if len(items) else EMPTY_LIST


def _parse_list(text: str) -> list[int] | None:
  text = text.strip()
  if text == EMPTY_LIST:
    return []
  return [int(t) for t in text.split()] if re.fullmatch(r"-?\d+( -?\d+)*", text) else None


def _dedup(items):
  return list(dict.fromkeys(items))


_LIST_OPS: dict[str, Callable[[list[int], int | None], list[int]]] = {
    "sort": lambda xs, m: sorted(xs),
    "rev": lambda xs, m: xs[::-1],
    "even": lambda xs, m: [x for x in xs if x % 2 == 0],
    "cumsum": lambda xs, m: [_reduce(int(v), m) for v in np.cumsum(xs)] if xs else [],
    "dedup": lambda xs, m: _dedup(xs),
}
_STRING_OPS: dict[str, Callable[[str], str]] = {
    "rev": lambda s: s[::-1],
    "sortc": lambda s: "".join(sorted(s)),
    "dropv": lambda s: "".join(c for c in s if c not in _VOWELS),
    "dup": lambda s: "".join(c + c for c in s),
    "upper": lambda s: s.upper(),
}


def chain_steps(task: Task, corrupt: Corrupt | None = None) -> list[tuple[str, str]]:
  """[(operation, value after it as text)] for a `list` or `string` task, whose prompt is 'op,op,...:input'.
  `corrupt(i, value)` may replace the value after step i (a list or a str), which later steps then build on."""
  names, _, start = task.prompt.partition(":")
  value = _parse_list(start) if task.family == "list" else start
  out = []
  for i, name in enumerate(names.split(",")):
    value = _LIST_OPS[name](value, task.modulus) if task.family == "list" else _STRING_OPS[name](value)
    value = corrupt(i, value) if corrupt else value
    out.append((name, _format_list(value) if task.family == "list" else value))
  return out


def _chain_task(family: str, level: int, rng: np.random.Generator, config: TaskConfig) -> Task:
  names = list(rng.choice(list(config.list_ops if family == "list" else config.string_ops), level))
  if family == "list":
    start = _format_list([int(v) for v in rng.integers(0, config.max_operand + 1, 2 + level)])
  else:
    start = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 2 + level))
  task = Task(family, level, f"{','.join(names)}:{start}", "?", modulus=config.modulus)
  return dataclasses.replace(task, answer=chain_steps(task)[-1][1])


# ------------------------------------------------------------------------------------------------------------ code

_CODE_NODES = (ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Return, ast.If, ast.IfExp, ast.Compare,
               ast.BinOp, ast.UnaryOp, ast.Name, ast.Constant, ast.Load, ast.Add, ast.Sub, ast.Mult, ast.Mod,
               ast.FloorDiv, ast.USub, ast.Gt, ast.Lt, ast.GtE, ast.LtE, ast.Eq, ast.NotEq)
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Mod: operator.mod,
           ast.FloorDiv: operator.floordiv}
_COMPARE = {ast.Gt: operator.gt, ast.Lt: operator.lt, ast.GtE: operator.ge, ast.LtE: operator.le,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}


class _Unsupported(Exception):
  pass


class _FellThrough(_Unsupported):
  """A body ended without returning (an `if` without `else` whose test was false)."""


def _evaluate(node: ast.AST, x: int) -> int:
  if isinstance(node, ast.Constant) and isinstance(node.value, int):
    return node.value
  if isinstance(node, ast.Name) and node.id == "x":
    return x
  if isinstance(node, ast.BinOp):
    left, right = _evaluate(node.left, x), _evaluate(node.right, x)
    if isinstance(node.op, (ast.Mod, ast.FloorDiv)) and right == 0:
      raise _Unsupported("division by zero")
    if abs(left) > 10**9 or abs(right) > 10**9:
      raise _Unsupported("number too large")
    return _BINARY[type(node.op)](left, right)
  if isinstance(node, ast.UnaryOp):
    return -_evaluate(node.operand, x)
  if isinstance(node, ast.Compare) and len(node.ops) == 1:
    return int(_COMPARE[type(node.ops[0])](_evaluate(node.left, x), _evaluate(node.comparators[0], x)))
  if isinstance(node, ast.IfExp):
    return _evaluate(node.body if _evaluate(node.test, x) else node.orelse, x)
  raise _Unsupported(type(node).__name__)


def _run_body(body: list[ast.stmt], x: int) -> int:
  for statement in body:
    if isinstance(statement, ast.Return) and statement.value is not None:
      return _evaluate(statement.value, x)
    if isinstance(statement, ast.If):
      branch = statement.body if _evaluate(statement.test, x) else statement.orelse
      if branch:
        try:
          return _run_body(branch, x)
        except _FellThrough:
          continue
      continue
    raise _Unsupported(type(statement).__name__)
  raise _FellThrough()


def run_code_tests(source: str, tests: Iterable[tuple[int, int]]) -> tuple[int, int]:
  """(passed, total) of `def f(x): ...` on the tests, interpreted from its AST: only integer arithmetic,
  comparisons, if/else and return are allowed, so nothing the model writes is executed. Unparsable or
  out-of-subset code passes nothing."""
  tests = list(tests)
  try:
    with warnings.catch_warnings():  # a sampled candidate's "3if" is the model's mistake, not the caller's
      warnings.simplefilter("ignore", SyntaxWarning)
      tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return 0, len(tests)
  functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "f"]
  if len(tree.body) != 1 or len(functions) != 1 or [a.arg for a in functions[0].args.args] != ["x"]:
    return 0, len(tests)
  if not all(isinstance(n, _CODE_NODES) for n in ast.walk(tree)):
    return 0, len(tests)
  passed = 0
  for x, expected in tests:
    try:
      passed += _run_body(functions[0].body, x) == expected
    except (_Unsupported, RecursionError):
      pass
  return passed, len(tests)


def _code_expression(n_ops: int, rng: np.random.Generator) -> str:
  expression = "x"
  for _ in range(n_ops):
    op, constant = str(rng.choice(["+", "-", "*"])), int(rng.integers(1, 6))
    if op == "*" and expression != "x":
      expression = f"({expression})"
    expression = f"{expression}{op}{constant}"
  return expression


def _code_task(level: int, rng: np.random.Generator, config: TaskConfig) -> Task:
  del config
  # Operators in the expression: 2, 3 (no branch), then 2, 3, 4 with a branch; level 1 has 225 distinct tasks,
  # so held-out evaluation items leave training prompts at every level.
  then = _code_expression(1 + level if level < 3 else level - 1, rng)
  if level >= 3:
    threshold, otherwise = int(rng.integers(0, 6)), _code_expression(1 + level // 4, rng)
    description = f"f(x)={then} if {threshold}<x else {otherwise}"
  else:
    description = f"f(x)={then}"
  source = f"def f(x): return {description.removeprefix('f(x)=')}"
  inputs = rng.choice(np.arange(0, 10), 3 + min(level, 4) // 2, replace=False)
  body = ast.parse(source).body[0].body
  tests = tuple((int(x), _run_body(body, int(x))) for x in sorted(inputs))
  return Task("code", level, description, source, tests=tests)


# --------------------------------------------------------------------------------------------------- public API

def generate(family: str, level: int, n: int, seed: int, config: TaskConfig = TaskConfig()) -> list[Task]:
  """n tasks of one family and level, drawn from `seed` (the same arguments give the same tasks)."""
  if family not in GENERATED_FAMILIES:
    raise ValueError(f"generate: family must be one of {GENERATED_FAMILIES}, got {family!r}")
  if level not in LEVELS:
    raise ValueError(f"generate: level must be in {LEVELS}, got {level!r}")
  rng = np.random.default_rng([seed, FAMILIES.index(family), level])
  make = {"arith": _arith_task, "code": _code_task}.get(family)
  return [make(level, rng, config) if make else _chain_task(family, level, rng, config) for _ in range(n)]


def extract_answer(text: str) -> str:
  """The final answer of a response's answer span: the last \\boxed{...} if there is one, else the stripped
  text."""
  boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
  return (boxed[-1] if boxed else text).strip()


def verify(task: Task, answer_text: str) -> bool:
  """Layer 1: is the final answer right? Exact for arith / list / string / exact; unit tests for code."""
  answer = extract_answer(answer_text)
  if task.family == "code":
    passed, total = run_code_tests(answer, task.tests)
    return passed == total
  return answer == task.answer.strip()


def check_steps(task: Task, reasoning: str) -> bool:
  """Layer 2: recompute every step of a trace written in the teacher's format. arith: each 'x op y=z' is right
  and the last result is the answer; list / string: each 'op=value' applies op to the previous value; code: each
  'f(a)=b' matches the reference. Lines of restatement (no '=') are skipped. `exact` tasks have no steps."""
  if task.family == "exact":
    return True
  steps = [s for s in reasoning.split(STEP_SEPARATOR) if "=" in s]
  if not steps:
    return False
  if task.family == "arith":
    last = None
    for step in steps:
      match = re.fullmatch(r"\s*(-?\d+)([+\-*])(-?\d+)=(-?\d+)\s*", step)
      if not match:
        return False
      x, op, y, z = int(match[1]), match[2], int(match[3]), int(match[4])
      if _reduce(_ARITH_OPS[op](x, y), task.modulus) != z:
        return False
      last = z
    return str(last) == task.answer
  if task.family == "code":
    body = ast.parse(task.answer).body[0].body
    for step in steps:
      match = re.fullmatch(r"\s*f\((-?\d+)\)=(-?\d+)\s*", step)
      if not match or _run_body(body, int(match[1])) != int(match[2]):
        return False
    return True
  expected = chain_steps(task)
  written = [s.strip().partition("=") for s in steps]
  return len(written) == len(expected) and all(
      name == op and value == text for (op, _, value), (name, text) in zip(written, expected))


# ---------------------------------------------------------------------------------------------------------- JSONL

def task_to_json(task: Task) -> dict:
  record = {"family": task.family, "level": task.level, "prompt": task.prompt, "answer": task.answer}
  if task.tests:
    record["tests"] = [list(t) for t in task.tests]
  if task.modulus is not None:
    record["modulus"] = task.modulus
  return record


def load_jsonl(path: str) -> list[Task]:
  """Tasks from a JSONL file, one object per line with "prompt" and "answer" (strings) and optionally "family"
  (default "exact"), "level" (default 1), "tests" ([[input, output], ...], code only) and "modulus". Blank lines
  are skipped; any other malformed line is an error naming the file, the line and the problem."""
  tasks = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError("a line must be a JSON object")
        unknown = set(record) - {"family", "level", "prompt", "answer", "tests", "modulus"}
        if unknown:
          raise ValueError(f"unknown keys {sorted(unknown)}")
        for key in ("prompt", "answer"):
          if not isinstance(record.get(key), str):
            raise ValueError(f"{key!r} must be a string, got {record.get(key)!r}")
        tests = tuple((int(a), int(b)) for a, b in record.get("tests", ()))
        tasks.append(Task(record.get("family", "exact"), record.get("level", 1), record["prompt"],
                          record["answer"], tests=tests, modulus=record.get("modulus")))
      except (ValueError, TypeError) as error:
        raise ValueError(f"{path}:{number}: {error}") from None
  return tasks


def save_jsonl(path: str, tasks: Iterable[Task]) -> None:
  with open(path, "w") as f:
    for task in tasks:
      f.write(json.dumps(task_to_json(task)) + "\n")
