"""MARS: the maths verdicts (math-verify's known cases pinned), code through the sandbox, the evaluator, penalties,
the combination, and failing sources that give a defined reward with a logged reason."""

import logging
import time

import math_verify
import numpy as np
import pytest

from pangu.data.tokenizer import ByteTokenizer
from pangu.models import presets
from pangu.models.transformer import Decoder
from pangu.reason.rewards import (MARS, DecoderJudge, MARSConfig, RewardRequest, exact_rational, exact_score,
                                  format_error, has_repetition, last_boxed, math_score)


def boxed(text: str) -> str:
  return f"The answer is \\boxed{{{text}}}."


def test_last_boxed_takes_the_last_balanced_box():
  assert last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
  assert last_boxed("no box") is None
  assert last_boxed("\\boxed{unclosed") is None


@pytest.mark.parametrize("text, value", [("12", 12), ("-3/4", -0.75), ("0.125", 0.125), ("\\frac{2}{6}", 1 / 3),
                                         ("-\\dfrac{1}{2}", -0.5), ("1{,}000", 1000)])
def test_exact_rational_parses_numbers_exactly(text, value):
  assert float(exact_rational(text)) == pytest.approx(value, abs=0)


def test_exact_rational_refuses_non_rationals():
  assert exact_rational("\\pi") is None and exact_rational("x=3") is None and exact_rational("1/0") is None


# Each known math-verify case (spec 3e), with our verdict under the pinned math-verify; an upgrade that changes
# one fails here. (gold, predicted, our score (None: inconclusive), whether math-verify or the exact path decided it)
KNOWN_CASES = [
    ("13", "\\text{13}", 1.0, "math-verify"),  # fixed in math-verify 0.8.0
    ("\\dfrac{\\pi}{2}", "pi/2", 0.0, "math-verify"),  # false negative: plain pi/2 parses as i*p/2
    ("\\dfrac{\\pi}{2}", "\\pi/2", 1.0, "math-verify"),
    ("\\sqrt{1/n}", "\\frac{1}{\\sqrt{n}}", 0.0, "math-verify"),  # false negative
    ("3", "x=3", 1.0, "math-verify"),  # false positive: a relation accepted for a number
    ("0.0000001", "0.0000002", 0.0, "exact"),  # math-verify alone says equal (tolerance); exact path says no
    ("5", "\\foo{5}", None, "math-verify"),  # unparsed LaTeX: math-verify keeps only the string; we fall back
    ("2x=4", "x=2", 0.0, "math-verify"),  # equivalent equations judged unequal
    ("(1,2)", "1,2", 1.0, "math-verify"),  # false positive: an open interval equals a pair
    ("\\frac{1}{2}", "0.5", 1.0, "exact"),
]


@pytest.mark.parametrize("gold, predicted, expected, path", KNOWN_CASES)
def test_known_math_verify_cases(gold, predicted, expected, path):
  score = math_score(boxed(predicted), gold)
  if expected is None:
    assert score is None
  else:
    assert score is not None and score.score == expected, score
    assert score.reason.startswith("exact" if path == "exact" else "math-verify")


def test_tiny_values_are_a_math_verify_false_positive_we_avoid():
  gold, predicted = math_verify.parse("$0.0000001$"), math_verify.parse("$0.0000002$")
  assert math_verify.verify(gold, predicted, timeout_seconds=None)
  assert math_score(boxed("0.0000002"), "0.0000001").score == 0.0


def test_math_verify_gets_gold_first(monkeypatch):
  calls = []
  real_verify = math_verify.verify
  monkeypatch.setattr(math_verify, "verify", lambda g, p, **kw: calls.append((g, p)) or real_verify(g, p, **kw))
  math_score(boxed("\\sqrt{2}"), "\\sqrt{2}")
  (gold, predicted), = calls
  assert gold[1] == "\\sqrt{2}" and predicted[1] == "\\sqrt{2}"
  calls.clear()
  math_score(boxed("x=3"), "3")
  (gold, predicted), = calls
  assert gold[1] == "3" and predicted[1] == "x=3"


def test_only_the_answer_box_counts_not_a_missing_one():
  score = math_score("reasoning said \\boxed{4} but the answer has none", "4")
  assert score.score == 1.0  # the caller passes the answer span only; this one's last box is 4
  assert math_score("no box at all", "4").score == 0.0


def test_math_through_mars_routes_and_penalises_format():
  mars = MARS()
  good = mars(RewardRequest("math", "2+2?", boxed("4"), thinking="2+2=4", gold="4"))
  assert (good.reward, good.source, good.verified) == (1.0, "math", True)
  wrong = mars(RewardRequest("math", "2+2?", boxed("5"), thinking="2+2=5", gold="4"))
  assert wrong.reward == 0.0
  unboxed = mars(RewardRequest("math", "2+2?", "4", thinking="2+2=4", gold="4"))
  assert unboxed.reward == -0.5 and unboxed.format_error == "maths answer lacks \\boxed{}"


def test_unparsable_math_falls_back_to_the_evaluator():
  mars = MARS(evaluator=lambda prompt, response: 0.0)
  reward = mars(RewardRequest("math", "q", boxed("\\foo{x}"), gold="y"))
  assert reward.source == "judge" and reward.task_reward == 0.5 and "math inconclusive" in reward.reason
  alone = MARS()(RewardRequest("math", "q", boxed("\\foo{x}"), gold="y"))
  assert alone.source == "none" and alone.task_reward == 0.0


@pytest.mark.parametrize("answer, gold, expected", [
    ("1 2  3", "1 2 3", 1.0),  # whitespace runs collapse
    (" NCB ", "NCB", 1.0),
    ("\\boxed{1 2 3}", "1 2 3", 1.0),  # the last box when there is one
    ("1 2 3", "1 2 3 4", 0.0),
    ("ncb", "NCB", 0.0),  # case matters: `upper` is an operation of the string family
    ("", "none", 0.0),
])
def test_exact_source_matches_the_gold_text(answer, gold, expected):
  assert exact_score(answer, gold).score == expected


def test_exact_tasks_route_to_the_exact_source_with_penalties():
  mars = MARS()
  good = mars(RewardRequest("exact", "rev:ab", "ba", thinking="rev=ba", gold="ba"))
  assert (good.reward, good.source, good.verified) == (1.0, "exact", True)
  assert mars(RewardRequest("exact", "rev:ab", "ab", thinking="rev=ab", gold="ba")).reward == 0.0
  unclosed = mars(RewardRequest("exact", "rev:ab", "", thinking="rev=b", closed=False, gold="ba"))
  assert unclosed.reward == -0.5 and unclosed.format_error == "slow output never closes its reasoning"
  weighted = MARS(MARSConfig(combination="weighted_sum", exact_weight=3.0), evaluator=lambda p, r: 0.0)(
      RewardRequest("exact", "rev:ab", "ba", thinking="t", gold="ba"))
  assert weighted.task_reward == pytest.approx((3 * 1.0 + 0.5 * 0.5) / 3.5) and weighted.source == "exact+judge"


CODE = "```python\ndef square(x):\n  return x * x\n```"
CODE_TESTS = ("assert square(3) == 9", "assert square(-2) == 4", "assert square(0) == 0", "assert square(1) == 2")


def test_code_reward_is_the_sandbox_pass_rate():
  reward = MARS()(RewardRequest("code", "square", CODE, thinking="x*x", tests=CODE_TESTS))
  assert reward.task_reward == pytest.approx(3 / 4) and reward.source == "code"
  binary = MARS(MARSConfig(binary_code=True))(RewardRequest("code", "square", CODE, thinking="x", tests=CODE_TESTS))
  assert binary.task_reward == 0.0


def test_timeouting_code_gives_a_defined_reward_and_reason():
  loop = "```python\ndef square(x):\n  while True:\n    pass\n```"
  reward = MARS(MARSConfig(code_time_limit_s=0.5))(RewardRequest("code", "s", loop, thinking="x", tests=CODE_TESTS))
  assert reward.reward == 0.0
  assert "CPU time limit" in reward.reason or "wall-clock" in reward.reason


def test_crashing_evaluator_gives_the_failure_reward_and_logs(caplog):
  def broken(prompt, response):
    raise RuntimeError("judge out of memory")

  mars = MARS(MARSConfig(failure_reward=-0.25), evaluator=broken)
  with caplog.at_level(logging.WARNING, logger="pangu.reason.rewards"):
    reward = mars(RewardRequest("general", "q", "an answer", thinking="t"))
  assert reward.task_reward == -0.25 and "judge out of memory" in reward.reason
  assert any("judge out of memory" in record.getMessage() for record in caplog.records)


def test_hanging_evaluator_times_out(caplog):
  mars = MARS(MARSConfig(source_timeout_s=0.2), evaluator=lambda p, r: time.sleep(5) or 1.0)
  start = time.monotonic()
  with caplog.at_level(logging.WARNING, logger="pangu.reason.rewards"):
    reward = mars(RewardRequest("general", "q", "an answer", thinking="t"))
  assert time.monotonic() - start < 4  # the guard returns long before the 5 s sleep ends
  assert reward.task_reward == 0.0 and "timed out" in reward.reason and caplog.records


def test_general_reward_is_the_sigmoid_of_the_evaluator():
  reward = MARS(evaluator=lambda p, r: np.log(3.0))(RewardRequest("general", "q", "fine", thinking="t"))
  assert reward.task_reward == pytest.approx(0.75) and not reward.verified


def test_weighted_sum_combines_every_applicable_source():
  config = MARSConfig(combination="weighted_sum", math_weight=3.0, judge_weight=1.0)
  reward = MARS(config, evaluator=lambda p, r: 0.0)(RewardRequest("math", "q", boxed("4"), thinking="t", gold="4"))
  assert reward.task_reward == pytest.approx((3 * 1.0 + 1 * 0.5) / 4) and reward.source == "math+judge"


def _has_repetition_reference(tokens, min_n, max_n, repeats):
  for n in range(min_n, max_n + 1):
    for start in range(len(tokens) - repeats * n + 1):
      gram = tokens[start:start + n]
      if all(tokens[start + k * n:start + (k + 1) * n] == gram for k in range(repeats)):
        return True
  return False


def test_repetition_matches_a_brute_force_reference():
  rng = np.random.default_rng(0)
  for trial in range(200):
    length = int(rng.integers(0, 60))
    tokens = list(rng.integers(0, 3, size=length))
    if trial % 3 == 0 and length > 12:  # plant a repeated n-gram
      n = int(rng.integers(4, 7))
      tokens[2:2] = list(rng.integers(0, 3, size=n)) * 3
    assert has_repetition(tokens, min_n=4, max_n=8, repeats=3) == _has_repetition_reference(tokens, 4, 8, 3)


def test_repetition_penalty_applies_to_every_task():
  tokens = (1, 2, 3, 4) * 3
  reward = MARS()(RewardRequest("math", "q", boxed("4"), thinking="t", gold="4", tokens=tokens))
  assert reward.repetition and reward.reward == 0.5


@pytest.mark.parametrize("request_kwargs, expected", [
    ({"task": "general", "answer": "a", "closed": False}, "never closes"),
    ({"task": "general", "answer": "  "}, "empty answer"),
    ({"task": "general", "answer": "a", "mode": "fast", "thinking": "hmm"}, "reasoning span"),
    ({"task": "code", "answer": "def f(): pass", "tests": ("assert True",)}, "code block"),
    ({"task": "general", "answer": "fine"}, None),
    ({"task": "general", "answer": "fine", "mode": "fast"}, None),
])
def test_format_errors(request_kwargs, expected):
  error = format_error(RewardRequest(prompt="q", **request_kwargs))
  assert (error is None) if expected is None else (expected in error)


@pytest.mark.slow  # compiles a decoder twice
def test_decoder_judge_matches_the_model_logit_margin():
  import jax
  config = presets.tiny(vocab_size=ByteTokenizer().vocab_size)
  params = Decoder(config).init(jax.random.key(0), np.zeros((1, 1), np.int32))["params"]
  judge = DecoderJudge(config, params, ByteTokenizer(), good_token=ord("Y"), bad_token=ord("N"))
  tokens = judge.judge_tokens("2+2?", "4")
  logits = np.asarray(Decoder(config).apply({"params": params}, tokens[None]), np.float64)[0, -1]
  assert judge("2+2?", "4") == pytest.approx(logits[ord("Y")] - logits[ord("N")], rel=1e-5, abs=1e-6)
  with pytest.raises(ValueError, match="max_tokens"):
    DecoderJudge(config, params, ByteTokenizer(), good_token=1, bad_token=2, max_tokens=4)("long prompt", "x")


@pytest.mark.parametrize("kwargs, field", [
    ({"combination": "mean"}, "combination"),
    ({"judge_weight": -0.5}, "judge_weight"),
    ({"format_weight": -1.0}, "format_weight"),
    ({"failure_reward": 2.0}, "failure_reward"),
])
def test_config_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    MARSConfig(**kwargs)


def test_request_errors_name_the_field():
  with pytest.raises(ValueError, match="gold"):
    RewardRequest("math", "q", "a")
  with pytest.raises(ValueError, match="gold is required for task='exact'"):
    RewardRequest("exact", "q", "a")
  with pytest.raises(ValueError, match="tests"):
    RewardRequest("code", "q", "a")
