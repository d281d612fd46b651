"""Key-value retrieval ("needle in a haystack") over corpus text, with one-token keys and values.

Byte ids 0..255 are text; the ids above them are reserved task tokens: `n_keys` key tokens, then `n_values` value
tokens. A needle is the pair [key, value] buried in text; a query repeats the key, and the value is the answer.
One-token keys and values let a two-layer induction circuit (a previous-token head, then a head that matches the
query key) answer in one step, which a small byte model learns in a few hundred steps, where multi-byte keys and
digit values stay at chance (issue 15's log).

Everything is pure NumPy driven by an explicit `np.random.Generator`:
  * `dense_row`: associative-recall rows (MQAR, Zoology) dense with key -> value pairs; every later re-occurrence of
    a key is a supervised retrieval target.
  * `text_row`: corpus text with a few needles, each queried later and followed by its answer.
  * `training_batch`: a batch mixing both, {"inputs", "targets", "mask"} with the answers weighted.
  * `eval_prompt`: text with one needle at a chosen depth, ending with its query key (answer excluded).
"""

import dataclasses

import numpy as np

from pangu.config_checks import positive_ints

BYTES = 256


@dataclasses.dataclass(frozen=True)
class RetrievalVocab:
  """Task token ids above the bytes: keys [BYTES, BYTES + n_keys), values the next n_values ids."""

  n_keys: int = 64
  n_values: int = 64

  def __post_init__(self):
    positive_ints(self, "n_keys", "n_values")

  @property
  def value_base(self) -> int:
    return BYTES + self.n_keys

  @property
  def vocab_size(self) -> int:
    """The smallest model vocabulary that holds every task token."""
    return self.value_base + self.n_values

  def is_key(self, tokens: np.ndarray) -> np.ndarray:
    return (tokens >= BYTES) & (tokens < self.value_base)

  def is_value(self, tokens: np.ndarray) -> np.ndarray:
    return (tokens >= self.value_base) & (tokens < self.vocab_size)


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
  """tokens: the haystack with the needle, then the query key; answer: the value token [1]; depth: the needle's
  start as a share of the haystack."""

  tokens: np.ndarray
  answer: np.ndarray
  depth: float


class Haystack:
  """Corpus text as byte tokens to cut windows from."""

  def __init__(self, documents: list[str]):
    self.tokens = np.frombuffer("\n".join(documents).encode("utf-8"), np.uint8).astype(np.int32)
    if len(self.tokens) < 1024:
      raise ValueError(f"Haystack: the corpus text has {len(self.tokens)} bytes, need at least 1024")

  def cut(self, rng: np.random.Generator, length: int) -> np.ndarray:
    if not 0 <= length <= len(self.tokens):
      raise ValueError(f"Haystack.cut: {length} tokens asked, the corpus has {len(self.tokens)}")
    start = rng.integers(0, len(self.tokens) - length + 1)
    return self.tokens[start:start + length].copy()


def _pairs(rng: np.random.Generator, vocab: RetrievalVocab, count: int) -> tuple[np.ndarray, np.ndarray]:
  """`count` distinct keys with random values (values may repeat across keys)."""
  if count > vocab.n_keys:
    raise ValueError(f"retrieval: {count} distinct keys asked, the vocabulary has n_keys={vocab.n_keys}")
  keys = BYTES + rng.choice(vocab.n_keys, count, replace=False)
  return keys.astype(np.int32), (vocab.value_base + rng.integers(0, vocab.n_values, count)).astype(np.int32)


def eval_prompt(rng: np.random.Generator, vocab: RetrievalVocab, haystack: Haystack, length: int,
                depth: float) -> NeedlePrompt:
  """`length` tokens: text with one needle starting at `depth` of the text, then the query key."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"eval_prompt: depth must be in [0, 1], got {depth}")
  if length < 4:
    raise ValueError(f"eval_prompt: length must be >= 4, got {length}")
  (key,), (value,) = _pairs(rng, vocab, 1)
  text = haystack.cut(rng, length - 3)
  at = int(round(depth * len(text)))
  tokens = np.concatenate([text[:at], [key, value], text[at:], [key]]).astype(np.int32)
  return NeedlePrompt(tokens=tokens, answer=np.array([value], np.int32), depth=depth)


def eval_prompts(seed: int, vocab: RetrievalVocab, haystack: Haystack, length: int, count: int,
                 depths: tuple[float, float] = (0.0, 1.0)) -> list[NeedlePrompt]:
  """`count` prompts with needles at evenly spaced depths in `depths`, drawn from one seed."""
  rng = np.random.default_rng(seed)
  return [eval_prompt(rng, vocab, haystack, length, float(d)) for d in np.linspace(*depths, count)]


def dense_row(rng: np.random.Generator, vocab: RetrievalVocab, length: int, n_keys: int) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
  """(tokens [length], weights [length]): a stream of [key, value] pairs over `n_keys` keys of this row; weights[i]
  is 1 where tokens[i] is the value of a key seen before (a retrieval target), else 0."""
  keys, values = _pairs(rng, vocab, n_keys)
  picks = rng.integers(0, n_keys, (length + 1) // 2)
  tokens = np.stack([keys[picks], values[picks]], 1).reshape(-1)[:length]
  seen = np.zeros(n_keys, bool)
  weights = np.zeros(length, np.float32)
  for i, p in enumerate(picks):
    if 2 * i + 1 < length and seen[p]:
      weights[2 * i + 1] = 1.0
    seen[p] = True
  return tokens.astype(np.int32), weights


def text_row(rng: np.random.Generator, vocab: RetrievalVocab, haystack: Haystack, length: int,
             needles: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [length], weights [length]): text carrying `needles` needles, each queried once later with its answer;
  weights are 1 on text, 0 on the needles (unpredictable) and the query keys, 1 on the answers."""
  keys, values = _pairs(rng, vocab, needles)
  text = haystack.cut(rng, length - 4 * needles)
  cuts = np.sort(rng.choice(np.arange(1, len(text)), 2 * needles, replace=False))
  # Each needle before its own query: pair the i-th smallest of a random half with a later cut.
  order = rng.permutation(2 * needles)
  firsts, seconds = np.sort(cuts[order[:needles]]), np.sort(cuts[order[needles:]])
  firsts, seconds = np.minimum(firsts, seconds), np.maximum(firsts, seconds)
  which = rng.permutation(needles)
  events = sorted([(int(c), i, 0) for c, i in zip(firsts, which)] + [(int(c), i, 1) for c, i in zip(seconds, which)])
  tokens, weights, last = [], [], 0
  for cut, i, is_query in events:
    tokens += [text[last:cut], [keys[i], values[i]]]
    weights += [np.ones(cut - last), [0.0, float(is_query)]]
    last = cut
  tokens.append(text[last:])
  weights.append(np.ones(len(text) - last))
  return np.concatenate(tokens).astype(np.int32), np.concatenate(weights).astype(np.float32)


def training_batch(rng: np.random.Generator, vocab: RetrievalVocab, haystack: Haystack, *, batch: int, length: int,
                   dense_share: float, needles: int, answer_weight: float) -> dict[str, np.ndarray]:
  """{"inputs", "targets", "mask"} [batch, length]: the first round(dense_share * batch) rows `dense_row`s (about
  length / 8 keys each), the rest `text_row`s; the mask weighs retrieval answers `answer_weight`, text 1."""
  if not 0.0 <= dense_share <= 1.0:
    raise ValueError(f"training_batch: dense_share must be in [0, 1], got {dense_share}")
  rows, weights = [], []
  for r in range(batch):
    if r < round(dense_share * batch):
      row, weight = dense_row(rng, vocab, length + 1, min(vocab.n_keys, max(1, length // 8)))
      weight = weight * answer_weight
    else:
      row, weight = text_row(rng, vocab, haystack, length + 1, needles)
      weight = np.where(vocab.is_value(row), answer_weight * weight, weight)
    rows.append(row)
    weights.append(weight)
  tokens, weights = np.stack(rows), np.stack(weights)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": weights[:, 1:].astype(np.float32)}
