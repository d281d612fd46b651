"""Retrieval data: the needle sits where asked, every target is the value its key's needle carried earlier."""

import numpy as np
import pytest

from pangu.data import retrieval

TEXT = ["The quick brown fox (jumps) over the lazy dog. " * 60]
VOCAB = retrieval.RetrievalVocab(n_keys=6, n_values=5)


def _pair(token: int) -> tuple[int, int]:
  """(key, value) tokens a needle token carries, decoded independently of the module."""
  index = token - (retrieval.BYTES + 6 + 5)
  return retrieval.BYTES + index // 5, retrieval.BYTES + 6 + index % 5


def test_vocab_ids_are_disjoint_and_needles_decode():
  assert VOCAB.vocab_size == 256 + 6 + 5 + 30
  ids = np.arange(VOCAB.vocab_size)
  kinds = np.stack([ids < 256, VOCAB.is_key(ids), VOCAB.is_value(ids), VOCAB.is_needle(ids)])
  assert np.all(kinds.sum(0) == 1)
  keys, values = np.array([256, 261]), np.array([262, 266])
  assert [_pair(int(t)) for t in VOCAB.needle(keys, values)] == [(256, 262), (261, 266)]


def test_eval_prompt_has_one_needle_at_its_depth_and_ends_with_its_key():
  prompt = retrieval.eval_prompt(np.random.default_rng(0), VOCAB, retrieval.Haystack(TEXT), 400, 0.25)
  tokens = prompt.tokens
  assert tokens.shape == (400,) and prompt.answer.shape == (1,)
  (at,) = np.flatnonzero(VOCAB.is_needle(tokens))
  assert np.flatnonzero(tokens >= retrieval.BYTES).tolist() == [at, 399]
  assert _pair(int(tokens[at])) == (tokens[399], prompt.answer[0])
  assert at == round(0.25 * 398)
  text = bytes(tokens[tokens < retrieval.BYTES].astype(np.uint8))
  assert len(text) == 398 and text in TEXT[0].encode()  # one contiguous corpus window around the needle


def test_query_row_queries_every_needle_of_the_prompt_in_its_suffix():
  tokens, answers = retrieval.query_row(np.random.default_rng(3), VOCAB, retrieval.Haystack(TEXT), 200, 20, 4)
  assert tokens.shape == answers.shape == (220,)
  prompt, suffix = tokens[:200], tokens[200:]
  needles = prompt[VOCAB.is_needle(prompt)]
  assert len(needles) == 4 and VOCAB.is_key(prompt[-1:]).all()
  carried = dict(_pair(int(t)) for t in needles)
  queried = [prompt[-1], *suffix[1:7:2]]  # the prompt's last key, then the suffix's keys
  assert sorted(queried) == sorted(carried)
  assert [carried[k] for k in queried] == suffix[0:7:2].tolist()  # each answer is its key's needle value
  assert np.flatnonzero(answers).tolist() == [200, 202, 204, 206]
  assert (suffix[7:] < retrieval.BYTES).all() and (prompt[~VOCAB.is_needle(prompt)][:-1] < retrieval.BYTES).all()
  with pytest.raises(ValueError, match="suffix_length >= 7"):
    retrieval.query_row(np.random.default_rng(3), VOCAB, retrieval.Haystack(TEXT), 200, 6, 4)
  with pytest.raises(ValueError, match="prompt_length >= 10"):
    retrieval.query_row(np.random.default_rng(3), VOCAB, retrieval.Haystack(TEXT), 9, 20, 4)
  tokens, _ = retrieval.query_row(np.random.default_rng(3), VOCAB, retrieval.Haystack(TEXT), 10, 20, 4)
  assert VOCAB.is_needle(tokens[:10]).sum() == 4  # the shortest prompt still holds every needle


def test_dense_row_targets_are_the_values_of_needles_shown_before():
  tokens, weights = retrieval.dense_row(np.random.default_rng(1), VOCAB, 101, 6)
  assert tokens.shape == weights.shape == (101,)
  table, i, answers = {}, 0, 0
  while i < 100:
    if VOCAB.is_needle(tokens[i]):
      key, value = _pair(int(tokens[i]))
      table[key] = value
      assert weights[i] == 0
      i += 1
    else:
      assert VOCAB.is_key(tokens[i]) and table[int(tokens[i])] == tokens[i + 1]
      assert weights[i] == 0 and weights[i + 1] == 1
      answers += 1
      i += 2
  assert len(table) <= 6 and weights[:i].sum() == answers > 20


def test_text_row_queries_every_needle_after_it_with_its_answer():
  tokens, weights = retrieval.text_row(np.random.default_rng(2), VOCAB, retrieval.Haystack(TEXT), 500, 4)
  assert tokens.shape == weights.shape == (500,)
  needles, keys = np.flatnonzero(VOCAB.is_needle(tokens)), np.flatnonzero(VOCAB.is_key(tokens))
  assert len(needles) == len(keys) == 4 and np.all(VOCAB.is_value(tokens[keys + 1]))
  for at in needles:
    key, value = _pair(int(tokens[at]))
    (query,) = keys[tokens[keys] == key]
    assert query > at and tokens[query + 1] == value
    assert weights[at] == weights[query] == 0 and weights[query + 1] == 1
  assert np.all(weights[tokens < retrieval.BYTES] == 1)


def test_training_batch_is_shifted_and_weighs_answers():
  batch = retrieval.training_batch(np.random.default_rng(3), VOCAB, retrieval.Haystack(TEXT), batch=4, length=64,
                                   dense_share=0.5, needles=2, answer_weight=5.0)
  assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (4, 64)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert set(np.unique(batch["mask"][:2])) <= {0.0, 5.0}
  answers = batch["mask"] == 5.0
  assert answers[2:].sum() == 4 and np.all(VOCAB.is_value(batch["targets"][answers]))
  assert np.all(VOCAB.is_key(batch["inputs"][answers]))


def test_same_seed_same_data_and_errors_name_the_field():
  a = retrieval.eval_prompts(7, VOCAB, retrieval.Haystack(TEXT), 128, 3)
  b = retrieval.eval_prompts(7, VOCAB, retrieval.Haystack(TEXT), 128, 3)
  assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, b))
  assert [p.depth for p in a] == [0.0, 0.5, 1.0]
  with pytest.raises(ValueError, match="n_keys"):
    retrieval.RetrievalVocab(n_keys=0)
  with pytest.raises(ValueError, match="depth"):
    retrieval.eval_prompt(np.random.default_rng(0), VOCAB, retrieval.Haystack(TEXT), 100, 1.5)
  with pytest.raises(ValueError, match="n_keys=6"):
    retrieval.dense_row(np.random.default_rng(0), VOCAB, 100, 7)
  with pytest.raises(ValueError, match="at least 1024"):
    retrieval.Haystack(["short"])
