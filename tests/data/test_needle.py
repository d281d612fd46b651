"""Passkey haystacks: the needle sits where asked, every training needle is queried later with its answer."""

import re

import numpy as np
import pytest

from pangu.data import needle

TEXT = ["The quick brown fox (jumps) over the lazy dog. " * 60]


def _text(tokens):
  return bytes(np.asarray(tokens, np.uint8)).decode()


def test_eval_prompt_has_one_needle_at_its_depth_and_ends_with_its_query():
  haystack = needle.Haystack(TEXT)
  prompt = needle.eval_prompt(np.random.default_rng(0), haystack, 400, 0.25)
  text = _text(prompt.tokens)
  assert len(prompt.tokens) == 400 + 3
  (match,) = re.finditer(r"<([a-z]) (\d{5})>", text)
  assert text.endswith(f"<{match.group(1)} ")
  assert _text(prompt.answer) == match.group(2)
  assert abs(match.start() - 0.25 * (400 - 9)) <= 1


def test_training_rows_query_every_needle_after_it_with_its_answer():
  row = needle.training_row(np.random.default_rng(1), needle.Haystack(TEXT), 500, 4)
  text = _text(row)
  assert len(row) == 500
  found = [(m.start(), m.group(1), m.group(2)) for m in re.finditer(r"<([a-z]) (\d{5})>", text)]
  assert len(found) == 8
  for key in {k for _, k, _ in found}:
    occurrences = [(at, value) for at, k, value in found if k == key]
    assert len(occurrences) == 2 and occurrences[0][1] == occurrences[1][1]
  assert max(at for at, *_ in found[:4]) < min(at for at, *_ in found[4:])  # needles before queries


def test_haystack_refuses_short_text_and_long_cuts():
  with pytest.raises(ValueError, match="at least 1024"):
    needle.Haystack(["short"])
  with pytest.raises(ValueError, match="tokens asked"):
    needle.Haystack(TEXT).cut(np.random.default_rng(0), 10**6)
