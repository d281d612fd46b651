"""Synthetic passkey retrieval ("needle in a haystack") over corpus text, in byte tokens.

A needle is `<k 83915>`: a key letter and a 5-digit value buried in text. A query repeats `<k ` later, and the
value is the answer; only a model (and a KV cache) that still sees the needle can produce it. Training rows
carry several needles, each queried later with its answer, so the loss teaches retrieval; evaluation prompts
carry one needle at a chosen depth and end with its query.
"""

import dataclasses
import string

import numpy as np


VALUE_DIGITS = 5


def _encode(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def needle_text(key: str, value: str) -> str:
  return f"<{key} {value}>"


def query_text(key: str) -> str:
  return f"<{key} "


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
  """tokens: the haystack with the needle, then the query; answer: the value's tokens; depth: the needle's
  start as a share of the haystack."""

  tokens: np.ndarray
  answer: np.ndarray
  depth: float


class Haystack:
  """Byte-token corpus text to cut haystacks from (ASCII only, no `<`, so needles are unambiguous)."""

  def __init__(self, documents: list[str]):
    text = "\n".join(documents).encode("ascii", "ignore").decode().replace("<", "(")
    if len(text) < 1024:
      raise ValueError(f"Haystack: the corpus text has {len(text)} characters, need at least 1024")
    self.tokens = _encode(text)

  def cut(self, rng: np.random.Generator, length: int) -> np.ndarray:
    if length > len(self.tokens):
      raise ValueError(f"Haystack.cut: {length} tokens asked, the corpus has {len(self.tokens)}")
    start = rng.integers(0, len(self.tokens) - length + 1)
    return self.tokens[start:start + length].copy()


def _random_needle(rng: np.random.Generator, keys: str = string.ascii_lowercase) -> tuple[str, str]:
  return str(rng.choice(list(keys))), "".join(rng.choice(list(string.digits), VALUE_DIGITS))


def eval_prompt(rng: np.random.Generator, haystack: Haystack, context: int, depth: float) -> NeedlePrompt:
  """`context` tokens of text with one needle starting at `depth` of it, then the query (answer excluded)."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"eval_prompt: depth must be in [0, 1], got {depth}")
  key, value = _random_needle(rng)
  needle = _encode(needle_text(key, value))
  text = haystack.cut(rng, context - len(needle))
  at = int(round(depth * (len(text))))
  tokens = np.concatenate([text[:at], needle, text[at:], _encode(query_text(key))])
  return NeedlePrompt(tokens=tokens, answer=_encode(value), depth=depth)


def training_row(rng: np.random.Generator, haystack: Haystack, length: int, needles: int) -> np.ndarray:
  """`length` tokens of text carrying `needles` distinct needles, each followed later by its query and answer."""
  keys = rng.choice(list(string.ascii_lowercase), needles, replace=False)
  values = ["".join(rng.choice(list(string.digits), VALUE_DIGITS)) for _ in keys]
  pieces = [(needle_text(k, v), needle_text(k, v)) for k, v in zip(keys, values)]  # the query ends with its answer
  inserts = sum(2 * len(p[0]) for p in pieces)
  text = haystack.cut(rng, length - inserts)
  cuts = np.sort(rng.choice(np.arange(1, len(text)), 2 * needles, replace=False))
  order = rng.permutation(needles)
  firsts, seconds = cuts[:needles], cuts[needles:]  # every needle before every query
  segments, last = [], 0
  events = sorted([(c, _encode(pieces[i][0])) for c, i in zip(firsts, order)] +
                  [(c, _encode(pieces[i][1])) for c, i in zip(seconds, order)], key=lambda e: e[0])
  for cut, piece in events:
    segments += [text[last:cut], piece]
    last = cut
  segments.append(text[last:])
  return np.concatenate(segments)


class NeedleBatches:
  """Resumable training batches ({"inputs", "targets", "mask"}) of `training_row`s for pangu.train.loop."""

  def __init__(self, haystack: Haystack, *, batch: int, length: int, needles: int, seed: int = 0):
    self.haystack, self.batch, self.length, self.needles = haystack, batch, length, needles
    self.seed, self.step = seed, 0

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, self.step])
    self.step += 1
    rows = np.stack([training_row(rng, self.haystack, self.length + 1, self.needles) for _ in range(self.batch)])
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "mask": np.ones((self.batch, self.length), np.float32)}

  def state(self) -> dict:
    return {"step": self.step, "seed": self.seed}

  def restore(self, state: dict) -> None:
    self.step, self.seed = int(state["step"]), int(state["seed"])
