"""GRPO on the student: MARS scores the chat format's answers, and a train step runs end to end."""

import jax
import numpy as np
import pytest

from pangu import models
from pangu.data.tokenizer import ByteTokenizer
from pangu.reason import chat, grpo, rewards, rl, tasks

FMT = chat.COMPACT_FORMAT
TASK_CONFIG = tasks.TaskConfig(modulus=10, arith_ops="+-")


def _reply(answer: str, reasoning: str = "2+3=5") -> str:
  return chat.render_response(reasoning, answer, mode="slow", fmt=FMT)


def test_mars_rewards_the_correct_answer_and_penalises_a_broken_reply():
  task = tasks.generate("arith", 1, 1, 0, TASK_CONFIG)[0]
  wrong = str((int(task.answer) + 1) % 10)
  mars = rewards.MARS()
  score = lambda text: mars(rl.reward_request(task, text, [1, 2, 3], FMT, "slow"))
  assert score(_reply(task.answer)).reward == 1.0
  assert score(_reply(wrong)).reward == 0.0
  broken = score(_reply(task.answer)[:2])  # cut before the reasoning closes
  assert broken.format_error is not None and broken.reward < 0


@pytest.mark.parametrize("family", ["list", "string"])
def test_list_and_string_replies_are_scored_by_exact_match(family):
  task = tasks.generate(family, 2, 1, 0, TASK_CONFIG)[0]
  mars = rewards.MARS()
  good = mars(rl.reward_request(task, _reply(task.answer, "step=x"), [1, 2, 3], FMT, "slow"))
  assert (good.reward, good.source) == (1.0, "exact")
  assert mars(rl.reward_request(task, _reply(task.answer + "x", "step=x"), [1, 2, 3], FMT, "slow")).reward == 0.0


def test_code_replies_run_against_the_task_tests_in_the_sandbox():
  """The answer field is the function (fenced for MARS); each unit test of the task becomes an assert."""
  task = tasks.generate("code", 1, 1, 0)[0]
  fmt = chat.RELEASE_FORMAT  # its turn end is not a newline, so a multi-line function fits the answer field
  reply = lambda answer: chat.render_response("f(1)=?", answer, mode="slow", fmt=fmt)  # noqa: E731
  mars = rewards.MARS()
  request = rl.reward_request(task, reply(task.answer), [1, 2, 3], fmt, "slow")
  assert request.tests == tuple(f"assert f({x}) == {y}" for x, y in task.tests)
  assert mars(request).reward == 1.0 and mars(request).source == "code"
  constant = mars(rl.reward_request(task, reply(f"def f(x):\n  return {task.tests[0][1]}"), [1], fmt, "slow"))
  expected = np.mean([y == task.tests[0][1] for _, y in task.tests])  # the tests a constant function passes
  assert constant.task_reward == pytest.approx(expected)


def test_bad_configs_are_named():
  with pytest.raises(ValueError, match="RLConfig.mode"):
    rl.RLConfig(mode="auto")
  with pytest.raises(ValueError, match="RLConfig.steps"):
    rl.RLConfig(steps=0)
  with pytest.raises(ValueError, match="RLConfig.warmup_steps"):
    rl.RLConfig(steps=3, warmup_steps=3)


class _ParityScorer:
  """A scorer with MARS's call signature whose reward varies within a group (parity of the reply's byte sum)."""

  def __call__(self, request):
    return rewards.MARSReward(reward=float(sum(request.tokens) % 2), task_reward=0.0, source="parity",
                              verified=False, repetition=False, format_error=None, reason="test")


@pytest.mark.parametrize("scorer, moves", [(rewards.MARS(), False), (_ParityScorer(), True)],
                         ids=["no_signal", "signal"])
def test_a_grpo_step_moves_the_params_only_when_the_group_rewards_differ(scorer, moves):
  """A random student gets equal MARS rewards in a group (zero advantages) and starts at the reference (zero KL),
  so its gradient and update are exactly zero; rewards that differ move it. The input params are never changed."""
  tokenizer = ByteTokenizer()
  config = models.tiny(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)
  params = models.init_params(config, jax.random.key(0))
  before = jax.tree.map(np.array, params)
  items = tasks.generate("arith", 1, 8, 0, TASK_CONFIG)
  trained, history = rl.train_grpo(config, params, items, tokenizer, FMT,
                                   rl.RLConfig(steps=1, prompts_per_step=2, warmup_steps=0, max_new_tokens=6,
                                               seq_len=48),
                                   grpo.GRPOConfig(num_generations=4, max_gen_batches=1), scorer,
                                   log=lambda _: None)
  assert len(history) == 1 and np.isfinite(history[0]["loss"])
  jax.tree.map(np.testing.assert_array_equal, params, before)
  moved = any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), trained, before)))
  assert moved == moves
  shifts = history[0]["logp_shift_positive"], history[0]["logp_shift_negative"]
  if moves:  # the rewarded replies' log-probs rise relative to the others'
    assert shifts[0] > shifts[1]
  else:
    assert shifts == (0.0, 0.0) and history[0]["update_norm"] == 0.0


def _mixed_pool():
  return (tasks.generate("arith", 1, 30, 0, TASK_CONFIG) + tasks.generate("list", 1, 6, 0, TASK_CONFIG)
          + tasks.generate("string", 1, 9, 0, TASK_CONFIG))


@pytest.mark.parametrize("n", [3, 7, 16])
def test_balanced_draws_split_the_prompts_evenly_over_families(n):
  items, rng = _mixed_pool(), np.random.default_rng(n)
  for _ in range(20):
    index = rl.draw_prompts(items, n, rng, balance=True)
    assert len(set(index.tolist())) == n
    counts = [sum(items[i].family == f for i in index) for f in ("arith", "list", "string")]
    assert sum(counts) == n and max(counts) - min(counts) <= 1
  # Unbalanced draws follow the pool (arith is 2/3 of it): over many draws arith takes well over a third.
  share = np.mean([items[i].family == "arith" for _ in range(50) for i in rl.draw_prompts(items, 9, rng,
                                                                                          balance=False)])
  assert share > 0.5


def test_a_balanced_draw_that_a_family_cannot_fill_is_an_error():
  with pytest.raises(ValueError, match="family 'list'"):
    rl.draw_prompts(_mixed_pool(), 21, np.random.default_rng(0), balance=True)


def test_family_diagnostics_match_a_hand_count():
  rewards = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0.5, -0.5, 0.5, 0.5], [-0.5] * 4])
  families = ["a", "a", "a", "b", "b"]
  advantages = np.arange(20.0).reshape(5, 4) - 10
  tokens = np.arange(20).reshape(5, 4)
  out = rl.family_diagnostics(families, rewards, advantages, tokens)
  assert out["a"]["groups"] == 3 and out["b"]["groups"] == 2
  assert (out["a"]["all_low"], out["a"]["all_high"], out["a"]["mixed"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
  assert (out["b"]["all_low"], out["b"]["all_high"], out["b"]["mixed"]) == pytest.approx((0.5, 0.0, 0.5))
  assert out["a"]["reward"] == pytest.approx(5 / 12) and out["b"]["reward"] == pytest.approx(-0.125)
  assert out["b"]["reward_std"] == pytest.approx(np.sqrt(0.1875) / 2)
  assert out["a"]["advantage_abs"] == pytest.approx(np.mean(np.abs(np.arange(12) - 10)))
  assert out["b"]["tokens"] == pytest.approx(np.mean(np.arange(12, 20)))
