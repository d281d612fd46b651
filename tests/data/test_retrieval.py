"""Retrieval data: the needle sits where asked, every target is the value its key was paired with earlier."""

import numpy as np
import pytest

from pangu.data import retrieval

TEXT = ["The quick brown fox (jumps) over the lazy dog. " * 60]
VOCAB = retrieval.RetrievalVocab(n_keys=16, n_values=8)


def test_eval_prompt_has_one_needle_at_its_depth_and_ends_with_its_key():
  prompt = retrieval.eval_prompt(np.random.default_rng(0), VOCAB, retrieval.Haystack(TEXT), 400, 0.25)
  tokens = prompt.tokens
  assert tokens.shape == (400,) and prompt.answer.shape == (1,)
  task = np.flatnonzero(tokens >= retrieval.BYTES)
  assert len(task) == 3  # needle key, needle value, query key
  at = task[0]
  assert VOCAB.is_key(tokens[at]) and tokens[at + 1] == prompt.answer[0] and VOCAB.is_value(prompt.answer[0])
  assert task[2] == 399 and tokens[399] == tokens[at]
  assert at == round(0.25 * (400 - 3))
  text = bytes(tokens[tokens < retrieval.BYTES].astype(np.uint8))
  assert len(text) == 397 and text in TEXT[0].encode()  # one contiguous corpus window around the needle


def test_dense_row_targets_are_the_values_of_keys_seen_before():
  tokens, weights = retrieval.dense_row(np.random.default_rng(1), VOCAB, 101, 6)
  assert tokens.shape == weights.shape == (101,)
  table = {}
  for i in range(0, 100, 2):
    key, value = int(tokens[i]), int(tokens[i + 1])
    assert VOCAB.is_key(key) and VOCAB.is_value(value)
    assert weights[i] == 0 and weights[i + 1] == (key in table)
    assert table.setdefault(key, value) == value  # one value per key within a row
  assert len(table) <= 6 and weights.sum() == 50 - len(table)


def test_text_row_queries_every_needle_after_it_with_its_answer():
  tokens, weights = retrieval.text_row(np.random.default_rng(2), VOCAB, retrieval.Haystack(TEXT), 500, 4)
  assert tokens.shape == weights.shape == (500,)
  keys = np.flatnonzero(VOCAB.is_key(tokens))
  assert len(keys) == 8 and np.all(VOCAB.is_value(tokens[keys + 1]))
  for key in set(tokens[keys].tolist()):
    first, second = keys[tokens[keys] == key]
    assert tokens[first + 1] == tokens[second + 1]
    assert weights[first] == weights[first + 1] == weights[second] == 0 and weights[second + 1] == 1
  text = ~(VOCAB.is_key(tokens) | VOCAB.is_value(tokens))
  assert np.all(weights[text] == 1)


def test_training_batch_is_shifted_and_weighs_answers():
  batch = retrieval.training_batch(np.random.default_rng(3), VOCAB, retrieval.Haystack(TEXT), batch=4, length=64,
                                   dense_share=0.5, needles=2, answer_weight=5.0)
  assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (4, 64)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert set(np.unique(batch["mask"][:2])) <= {0.0, 5.0} and np.all(VOCAB.is_key(batch["inputs"][:2, ::2]))
  answers = batch["mask"][2:] == 5.0
  assert answers.sum() == 4 and np.all(VOCAB.is_value(batch["targets"][2:][answers]))


def test_same_seed_same_data_and_errors_name_the_field():
  a = retrieval.eval_prompts(7, VOCAB, retrieval.Haystack(TEXT), 128, 3)
  b = retrieval.eval_prompts(7, VOCAB, retrieval.Haystack(TEXT), 128, 3)
  assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, b))
  assert [p.depth for p in a] == [0.0, 0.5, 1.0]
  with pytest.raises(ValueError, match="n_keys"):
    retrieval.RetrievalVocab(n_keys=0)
  with pytest.raises(ValueError, match="depth"):
    retrieval.eval_prompt(np.random.default_rng(0), VOCAB, retrieval.Haystack(TEXT), 100, 1.5)
  with pytest.raises(ValueError, match="n_keys=16"):
    retrieval.dense_row(np.random.default_rng(0), VOCAB, 100, 17)
  with pytest.raises(ValueError, match="at least 1024"):
    retrieval.Haystack(["short"])
