"""Distillation pieces: complexity against a mock student with known pass rates, the Gaussian weight and the
selection draw, shortest-correct rejection sampling, the reply-masked SFT batch (its padding cut without changing
the loss or its gradient), auto labels and repetition detection."""

import jax
import numpy as np
import pytest

from pangu import models
from pangu.data.tokenizer import ByteTokenizer
from pangu.models.transformer import cross_entropy_loss
from pangu.reason import chat, distill, dual, tasks, teacher
from pangu.reason.teacher import Solution
from pangu.train import losses
from pangu.train.config import TrainConfig

FMT = chat.COMPACT_FORMAT
TOKENIZER = ByteTokenizer()


def test_complexity_of_a_mock_student_with_known_pass_rates():
  rng = np.random.default_rng(0)
  true_rates = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
  passed = rng.random((5, 4000)) < true_rates[:, None]
  np.testing.assert_allclose(distill.complexity(passed), 1 - true_rates, atol=0.03)
  np.testing.assert_array_equal(distill.complexity([[True, False, False, False]]), [0.75])
  with pytest.raises(ValueError, match=r"\[N, k\]"):
    distill.complexity(np.zeros((3,), bool))


def test_selection_weight_is_the_gaussian_and_peaks_at_mu():
  c = np.linspace(0, 1, 101)
  w = distill.selection_weights(c, mu=0.5, sigma=0.2)
  np.testing.assert_allclose(w, np.exp(-((c - 0.5) ** 2) / (2 * 0.04)), rtol=1e-12)
  assert c[np.argmax(w)] == 0.5 and w.max() == 1.0
  np.testing.assert_allclose(w, w[::-1])  # symmetric around mu


def test_select_draws_in_proportion_to_weight_and_applies_filters():
  c = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
  config = distill.DistillConfig(select=1)
  rng = np.random.default_rng(0)
  counts = np.bincount([distill.select(c, config, rng)[0] for _ in range(20000)], minlength=5)
  w = distill.selection_weights(c)
  np.testing.assert_allclose(counts / counts.sum(), w / w.sum(), atol=0.01)
  picked = distill.select(c, distill.DistillConfig(select=10, drop_extremes=True), rng)
  np.testing.assert_array_equal(picked, [1, 2, 3])
  picked = distill.select(c, distill.DistillConfig(select=10, band=(0.4, 0.8)), rng)
  np.testing.assert_array_equal(picked, [2, 3])
  uniform = np.bincount([distill.select(c, distill.DistillConfig(select=1, selection="uniform"), rng)[0]
                         for _ in range(5000)], minlength=5)
  assert uniform.min() > 900
  assert len(set(distill.select(c, distill.DistillConfig(select=3), np.random.default_rng(1)).tolist())) == 3
  np.testing.assert_array_equal(distill.select(c, distill.DistillConfig(select=3), np.random.default_rng(5)),
                                distill.select(c, distill.DistillConfig(select=3), np.random.default_rng(5)))


def test_shortest_correct_skips_wrong_and_prefers_short_then_low_index():
  task = tasks.generate("arith", 2, 1, seed=0, config=tasks.TaskConfig(modulus=10))[0]
  right = teacher.slow(task)
  wrong_answer = Solution(right.reasoning, str((int(right.answer) + 1) % 10))
  wrong_step = Solution("task x;" + right.reasoning.replace("=", "=1", 1), right.answer)
  verbose = Solution(f"task {task.prompt};" + right.reasoning, right.answer)
  assert distill.shortest_correct(task, [wrong_answer, verbose, right, right], TOKENIZER, FMT) == 2
  assert distill.shortest_correct(task, [verbose, wrong_step], TOKENIZER, FMT) == 0
  assert distill.shortest_correct(task, [wrong_answer, wrong_step], TOKENIZER, FMT) is None


def test_sft_batch_masks_only_the_reply():
  batch = distill.sft_batch(TOKENIZER, ["Q:1+2\n|"], ["<1+2=3>3\n"], seq_len=24)
  prompt_len, total = len("Q:1+2\n|"), len("Q:1+2\n|<1+2=3>3\n")
  mask = batch["mask"][0]
  assert mask[:prompt_len - 1].sum() == 0 and mask[prompt_len - 1:total - 1].all() and mask[total - 1:].sum() == 0
  targets = batch["targets"][0][mask > 0]
  assert TOKENIZER.decode(targets) == "<1+2=3>3\n"
  np.testing.assert_array_equal(batch["inputs"][0][1:total - 1], batch["targets"][0][:total - 2])
  with pytest.raises(ValueError, match="more than seq_len"):
    distill.sft_batch(TOKENIZER, ["Q:" + "1" * 30], ["x"], seq_len=16)


def test_length_multiple_cuts_only_padding_and_keeps_the_loss_and_its_gradient():
  prompts, replies = ["Q:1+2\n|", "Q:3-4+5\n|"], ["<1+2=3>3\n", "<3-4=9;9+5=4>4\n"]
  full = distill.sft_batch(TOKENIZER, prompts, replies, seq_len=64, weighting="reply")
  cut = distill.sft_batch(TOKENIZER, prompts, replies, seq_len=64, weighting="reply", length_multiple=16)
  longest = max(len(TOKENIZER.encode(p)) + len(TOKENIZER.encode(r)) for p, r in zip(prompts, replies)) - 1
  assert 16 < longest <= 32 and cut["inputs"].shape == (2, 32)
  for name in full:
    np.testing.assert_array_equal(cut[name], full[name][:, :32])
  assert not full["mask"][:, 32:].any()
  assert distill.sft_batch(TOKENIZER, prompts, replies, seq_len=24, length_multiple=16)["inputs"].shape == (2, 24)
  model = models.tiny(vocab_size=TOKENIZER.vocab_size, d_model=32, d_ff=64)
  params = models.init_params(model, jax.random.key(0))
  loss_fn = losses.lm_loss(model, TrainConfig())
  (loss_full, _), grads_full = jax.value_and_grad(loss_fn, has_aux=True)(params, full, jax.random.key(1))
  (loss_cut, _), grads_cut = jax.value_and_grad(loss_fn, has_aux=True)(params, cut, jax.random.key(1))
  np.testing.assert_allclose(float(loss_cut), float(loss_full), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads_cut, grads_full)
  with pytest.raises(ValueError, match="length_multiple must be"):
    distill.sft_batch(TOKENIZER, prompts, replies, seq_len=64, length_multiple=0)


def test_reply_weighting_makes_the_loss_the_mean_of_each_replys_mean_token_loss():
  prompts, replies = ["Q:1+2\n|", "Q:f(x)=x+1\n|"], ["<3>3\n", "<f(1)=2;f(2)=3>def f(x): return x+1\n"]
  token, reply = (distill.sft_batch(TOKENIZER, prompts, replies, seq_len=64, weighting=w) for w in ("token", "reply"))
  assert reply["mask"].sum() == pytest.approx(token["mask"].sum())
  logits = np.random.default_rng(0).normal(size=(2, 64, TOKENIZER.vocab_size))
  log_z = np.log(np.exp(logits).sum(-1))
  nll = log_z - np.take_along_axis(logits, token["targets"][..., None], -1)[..., 0]
  per_reply = [(nll[i] * token["mask"][i]).sum() / token["mask"][i].sum() for i in range(2)]
  loss, _ = cross_entropy_loss(logits.astype(np.float32), reply["targets"], reply["mask"])
  np.testing.assert_allclose(float(loss), np.mean(per_reply), rtol=1e-5)
  with pytest.raises(ValueError, match="weighting must be one of"):
    distill.sft_batch(TOKENIZER, prompts, replies, seq_len=64, weighting="sequence")


def test_auto_labels_and_fusion_examples():
  assert dual.auto_labels(np.array([0.0, 0.49, 0.5, 1.0])) == ["slow", "slow", "fast", "fast"]
  # The relative rule: also fast where fast passes at all and no less often than slow.
  fast, slow = np.array([0.0, 0.25, 0.25, 0.5, 0.8]), np.array([0.0, 0.5, 0.25, 0.0, 1.0])
  assert dual.auto_labels(fast, 0.75) == ["slow", "slow", "slow", "slow", "fast"]
  assert dual.auto_labels(fast, 0.75, slow) == ["slow", "slow", "fast", "fast", "fast"]
  with pytest.raises(ValueError, match="slow_pass_rate has shape"):
    dual.auto_labels(fast, 0.75, slow[:3])
  task = tasks.generate("arith", 1, 1, seed=0, config=tasks.TaskConfig(modulus=10))[0]
  pairs = dual.fusion_examples([task], [teacher.slow(task)], ["fast"], FMT)
  (slow_p, slow_r), (fast_p, fast_r), (auto_p, auto_r) = pairs
  assert fast_p.endswith("/no_think\n|") and auto_p.endswith("/auto_think\n|") and "/" not in slow_p
  assert chat.parse_response(slow_r, FMT).mode == "slow" and chat.parse_response(fast_r, FMT).mode == "fast"
  assert chat.parse_response(auto_r, FMT).chosen == "fast" and auto_r == FMT.auto_fast_tag + fast_r


def test_pass_matrix_fast_mode_fails_replies_that_reason():
  task = tasks.generate("arith", 2, 1, seed=0, config=tasks.TaskConfig(modulus=10))[0]
  right = teacher.slow(task)
  texts = [chat.render_response(right.reasoning, right.answer, mode="slow", fmt=FMT),
           chat.render_response(right.reasoning, right.answer, mode="fast", fmt=FMT),
           chat.render_response("", str((int(right.answer) + 1) % 10), mode="fast", fmt=FMT),
           chat.render_response(right.reasoning, right.answer, mode="slow", fmt=FMT)[:-1]]  # no end marker
  replies = distill.Replies(texts, np.array([len(t) for t in texts]), np.zeros(4, bool))
  expected = {None: [True, True, False, False], "slow": [True, True, False, False],
              "fast": [False, True, False, False], "auto": [True, True, False, False]}
  for mode, row in expected.items():
    np.testing.assert_array_equal(distill.pass_matrix([task], replies, 4, FMT, mode), [row])


def test_find_repetition():
  loop = [9, 8] + [1, 2, 3, 4] * 3 + [5]
  assert dual.find_repetition(loop) == (2, 4)
  assert dual.find_repetition([1, 2, 3, 4] * 2 + [7]) is None  # only twice
  assert dual.find_repetition([5] * 12) == (0, 4)  # a period-1 loop is also a 4-gram loop
  assert dual.find_repetition(list(range(40))) is None
  assert dual.find_repetition([1, 2, 3, 4, 5] * 3, min_n=4, max_n=4) is None  # period 5 outside the range
