"""Tasks, teacher and chat format: verifiers accept the teacher and reject perturbed answers and traces; mode
switches change the reply format; JSONL round trip and errors."""

import json

import numpy as np
import pytest

from pangu.reason import chat, tasks, teacher

CONFIGS = (tasks.TaskConfig(), tasks.TaskConfig(modulus=10))


def _perturb(task: tasks.Task, answer: str) -> list[str]:
  """Wrong answers of the same shape: a changed digit / letter, a dropped item, an extra item."""
  if task.family == "code":
    return [answer.replace("return ", "return 1+", 1), answer.replace("return ", "return -", 1), "def f(x):\n  retur"]
  changed = answer[:-1] + ("0" if answer[-1] != "0" else "1") if answer[-1].isdigit() else \
      answer[:-1] + ("q" if answer[-1] != "q" else "r")
  return [changed, answer + " 1", answer[1:] or "x"]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("family", tasks.GENERATED_FAMILIES)
def test_verifiers_accept_teacher_and_reject_perturbed(family, config):
  for level in tasks.LEVELS:
    for task in tasks.generate(family, level, 6, seed=level, config=config):
      solution = teacher.slow(task)
      assert tasks.verify(task, solution.answer), task
      assert tasks.check_steps(task, solution.reasoning), task
      assert tasks.verify(task, teacher.fast(task).answer)
      assert tasks.verify(task, f"\\boxed{{{solution.answer}}}") or family == "code"
      for wrong in _perturb(task, solution.answer):
        assert not tasks.verify(task, wrong), (task, wrong)


@pytest.mark.parametrize("family", tasks.GENERATED_FAMILIES)
def test_every_level_leaves_prompts_beyond_a_held_out_set(family):
  """Held-out evaluation items are removed from the training pool: no level may be a handful of distinct tasks."""
  for level in tasks.LEVELS:
    drawn = tasks.generate(family, level, 200, seed=0, config=tasks.TaskConfig(modulus=10))
    assert len({t.prompt for t in drawn}) >= 100, (family, level)


def test_arith_answer_matches_python_eval():
  """Independent reference: Python's own evaluation of the expression (standard precedence)."""
  for level in tasks.LEVELS:
    for task in tasks.generate("arith", level, 20, seed=3):
      assert int(task.answer) == eval(task.prompt)  # noqa: S307 (digits and + - * only)
    for task in tasks.generate("arith", level, 20, seed=3, config=tasks.TaskConfig(modulus=7)):
      assert int(task.answer) == eval(task.prompt) % 7  # noqa: S307


def test_code_checker_matches_python_on_reference_and_rejects_unsafe():
  for task in [t for level in tasks.LEVELS for t in tasks.generate("code", level, 4, seed=1)]:
    namespace = {}
    exec(task.answer, namespace)  # noqa: S102 (the generator's own reference code)
    assert all(namespace["f"](x) == y for x, y in task.tests)
    assert tasks.run_code_tests(task.answer, task.tests) == (len(task.tests), len(task.tests))
  tests = ((1, 1),)
  for source in ("import os\ndef f(x):\n  return x", "def f(x):\n  return __import__('os')", "def f(x):\n  return g(x)",
                 "def f(x):\n  while True: pass", "def f(y):\n  return y", "def f(x):\n  return x**99999"):
    assert tasks.run_code_tests(source, tests) == (0, 1), source


@pytest.mark.parametrize("family", tasks.GENERATED_FAMILIES)
def test_teacher_replies_survive_the_compact_format(family):
  """The compact format ends a turn at a newline and the reasoning at '>': every generated answer and trace
  (canonical, most verbose, fast) must parse back whole."""
  for level in tasks.LEVELS:
    for task in tasks.generate(family, level, 6, seed=level):
      solutions = ((teacher.slow(task), "slow"), (teacher.verbose(task), "slow"), (teacher.fast(task), "fast"))
      for solution, mode in solutions:
        reply = chat.render_response(solution.reasoning, solution.answer, mode=mode, fmt=chat.COMPACT_FORMAT)
        parsed = chat.parse_response(reply, chat.COMPACT_FORMAT)
        assert parsed.complete and (parsed.reasoning, parsed.answer) == (solution.reasoning, solution.answer), reply


def test_step_check_rejects_a_corrupted_step():
  rng = np.random.default_rng(0)
  for family in tasks.GENERATED_FAMILIES:
    task = tasks.generate(family, 4, 1, seed=7, config=tasks.TaskConfig(modulus=10))[0]
    steps = teacher.slow(task).reasoning.split(tasks.STEP_SEPARATOR)
    i = int(rng.integers(len(steps)))
    left, _, right = steps[i].rpartition("=")
    steps[i] = f"{left}={right}9"
    assert not tasks.check_steps(task, tasks.STEP_SEPARATOR.join(steps)), (family, steps)


def test_teacher_candidates_vary_and_errors_occur_at_q_err():
  task = tasks.generate("arith", 5, 1, seed=0, config=tasks.TaskConfig(modulus=10))[0]
  rng = np.random.default_rng(0)
  config = teacher.TeacherConfig(candidates=4, step_error=0.1)
  draws = [c for _ in range(300) for c in teacher.candidates(task, rng, config)]
  right = np.mean([tasks.verify(task, c.answer) and tasks.check_steps(task, c.reasoning) for c in draws])
  # every step right with probability 0.9^5 = 0.59 (a wrong step's error can cancel only through later ops)
  assert abs(right - 0.9 ** 5) < 0.06
  assert len({len(c.reasoning) for c in draws}) >= 3


def test_verbose_is_the_longest_correct_candidate():
  config = teacher.TeacherConfig(candidates=8, step_error=0.1)
  # code is left out: its restatement has an '=' that the step check reads as a step, so it never passes.
  for family in ("arith", "list", "string"):
    task = tasks.generate(family, 3, 1, seed=3, config=tasks.TaskConfig(modulus=10))[0]
    longest = teacher.verbose(task)
    assert tasks.verify(task, longest.answer) and tasks.check_steps(task, longest.reasoning)
    rng = np.random.default_rng(0)
    correct = [c for _ in range(100) for c in teacher.candidates(task, rng, config)
               if tasks.verify(task, c.answer) and tasks.check_steps(task, c.reasoning)]
    assert max(len(c.reasoning) for c in correct) == len(longest.reasoning)
    assert longest in correct
    assert len(longest.reasoning) > len(teacher.slow(task).reasoning)


def test_mode_switch_strings_change_the_format():
  fmt = chat.COMPACT_FORMAT
  assert chat.split_mode("2+3 /no_think") == ("2+3", "fast")
  assert chat.split_mode("2+3 /no_think /think") == ("2+3", "slow")
  assert chat.split_mode("2+3 /auto_think") == ("2+3", "auto")
  assert chat.split_mode("2+3") == ("2+3", "slow")
  prompts = {mode: chat.render_prompt("2+3 /no_think", mode=mode, fmt=fmt) for mode in chat.MODES}
  assert prompts == {"slow": "Q:2+3\n|", "fast": "Q:2+3 /no_think\n|", "auto": "Q:2+3 /auto_think\n|"}
  release = chat.render_prompt("hi", mode="fast")
  assert release == "[unused9]系统：[unused10][unused9]用户：hi /no_think[unused10][unused9]助手："
  slow = chat.render_response("2+3=5", "5", mode="slow")
  fast = chat.render_response("2+3=5", "5", mode="fast")
  assert slow == "[unused16]2+3=5[unused17]5[unused10]" and fast == "[unused16][unused17]5[unused10]"
  auto = chat.render_response("2+3=5", "5", mode="auto", chosen="fast", fmt=fmt)
  assert auto == "F<>5\n"
  assert chat.parse_response(auto, fmt) == chat.Response("fast", "fast", "", "5", True)
  assert chat.parse_response(slow) == chat.Response("slow", None, "2+3=5", "5", True)
  assert not chat.parse_response("<2+3=", fmt).complete
  with pytest.raises(ValueError, match="mode"):
    chat.render_prompt("x", mode="turbo")


def test_jsonl_round_trip_and_errors(tmp_path):
  items = tasks.generate("code", 3, 2, seed=0) + tasks.generate("list", 2, 2, seed=0, config=CONFIGS[1])
  path = tmp_path / "data.jsonl"
  tasks.save_jsonl(str(path), items)
  assert tasks.load_jsonl(str(path)) == items
  path.write_text(json.dumps({"prompt": "capital of France?", "answer": "Paris"}) + "\n\n")
  (loaded,) = tasks.load_jsonl(str(path))
  assert loaded.family == "exact" and tasks.verify(loaded, "Paris") and not tasks.verify(loaded, "Lyon")
  path.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
  with pytest.raises(ValueError, match=r"data.jsonl:2: 'answer' must be a string"):
    tasks.load_jsonl(str(path))
  path.write_text('{"prompt": "a", "answer": "b", "family": "poetry"}\n')
  with pytest.raises(ValueError, match=r":1: .*family"):
    tasks.load_jsonl(str(path))
