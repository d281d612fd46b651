"""Key-value retrieval ("needle in a haystack") over corpus text, with one-token needles, keys and values.

Byte ids 0..255 are text; the ids above them are reserved task tokens: `n_keys` key tokens, `n_values` value
tokens, then one needle token per (key, value) pair. A needle is that single token buried in text; a query is the
key token, and the answer is the value token. Since the needle carries its key and its value, one attention head
answers (the query key matches the needle, whose value it copies): a small model learns that in a few hundred
steps, where a separate key and value token need a two-head induction circuit that did not form within 500 steps
of dense associative-recall rows at D=64 (and multi-byte keys and digit values stayed at chance: issue 15's log).

Everything is pure NumPy driven by an explicit `np.random.Generator`:
  * `dense_row`: associative-recall rows (MQAR, Zoology) dense with needles and queries; every query is a target.
  * `text_row`: corpus text with a few needles, each queried later and followed by its answer.
  * `training_batch`: a batch mixing both, {"inputs", "targets", "mask"} with the answers weighted.
  * `eval_prompt`: text with one needle at a chosen depth, ending with its query key (answer excluded).
  * `query_row`: a prompt of text with several needles ending with one query key, then a suffix that answers it
    and queries every other needle (training rows for what reads a prompt, e.g. token-pruning predictors).
"""

import dataclasses

import numpy as np

from pangu.config_checks import positive_ints

BYTES = 256


@dataclasses.dataclass(frozen=True)
class RetrievalVocab:
  """Task token ids above the bytes: keys [BYTES, BYTES + n_keys), then n_values values, then the n_keys * n_values
  needles (needle of key i and value j: needle_base + i * n_values + j)."""

  n_keys: int = 16
  n_values: int = 16

  def __post_init__(self):
    positive_ints(self, "n_keys", "n_values")

  @property
  def value_base(self) -> int:
    return BYTES + self.n_keys

  @property
  def needle_base(self) -> int:
    return self.value_base + self.n_values

  @property
  def vocab_size(self) -> int:
    """The smallest model vocabulary that holds every task token."""
    return self.needle_base + self.n_keys * self.n_values

  def needle(self, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The needle tokens of key and value tokens."""
    return (self.needle_base + (keys - BYTES) * self.n_values + values - self.value_base).astype(np.int32)

  def is_key(self, tokens: np.ndarray) -> np.ndarray:
    return (tokens >= BYTES) & (tokens < self.value_base)

  def is_value(self, tokens: np.ndarray) -> np.ndarray:
    return (tokens >= self.value_base) & (tokens < self.needle_base)

  def is_needle(self, tokens: np.ndarray) -> np.ndarray:
    return (tokens >= self.needle_base) & (tokens < self.vocab_size)


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
  """`length` tokens: text with one needle at `depth` of the text, then the query key."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"eval_prompt: depth must be in [0, 1], got {depth}")
  if length < 3:
    raise ValueError(f"eval_prompt: length must be >= 3, got {length}")
  keys, values = _pairs(rng, vocab, 1)
  text = haystack.cut(rng, length - 2)
  at = int(round(depth * len(text)))
  tokens = np.concatenate([text[:at], vocab.needle(keys, values), text[at:], keys]).astype(np.int32)
  return NeedlePrompt(tokens=tokens, answer=values, depth=depth)


def eval_prompts(seed: int, vocab: RetrievalVocab, haystack: Haystack, length: int, count: int,
                 depths: tuple[float, float] = (0.0, 1.0)) -> list[NeedlePrompt]:
  """`count` prompts with needles at evenly spaced depths in `depths`, drawn from one seed."""
  rng = np.random.default_rng(seed)
  return [eval_prompt(rng, vocab, haystack, length, float(d)) for d in np.linspace(*depths, count)]


def query_row(rng: np.random.Generator, vocab: RetrievalVocab, haystack: Haystack, prompt_length: int,
              suffix_length: int, needles: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [prompt_length + suffix_length], answers [same]): a prompt of text carrying `needles` needles at
  random places and ending with the query key of one of them, then the suffix [its value, key, value, ...] that
  queries every other needle once, then text; answers is 1 on the value tokens of the suffix, 0 elsewhere."""
  if suffix_length < 2 * needles - 1 or prompt_length < 2 * needles + 2:
    raise ValueError(f"query_row: {needles} needles need prompt_length >= {2 * needles + 2} and suffix_length >= "
                     f"{2 * needles - 1}, got {prompt_length} and {suffix_length}")
  keys, values = _pairs(rng, vocab, needles)
  text = haystack.cut(rng, prompt_length - 1 - needles)
  cuts = np.sort(rng.choice(np.arange(1, len(text)), needles, replace=False))
  pieces = np.split(text, cuts)
  needle_tokens = vocab.needle(keys, values)
  order = rng.permutation(needles)
  prompt = [pieces[0]] + [piece for i in range(needles) for piece in ([needle_tokens[i]], pieces[i + 1])]
  queries = [values[order[0]]] + [token for i in order[1:] for token in (keys[i], values[i])]
  tokens = np.concatenate([*prompt, [keys[order[0]]], queries,
                           haystack.cut(rng, suffix_length - len(queries))]).astype(np.int32)
  return tokens, vocab.is_value(tokens).astype(np.float32)  # values occur only as the suffix's answers


def dense_row(rng: np.random.Generator, vocab: RetrievalVocab, length: int, n_keys: int) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
  """(tokens [length], weights [length]): needles of `n_keys` keys and queries [key, value] of keys whose needle
  came earlier, in random order; weights[i] is 1 where tokens[i] answers a query, else 0."""
  keys, values = _pairs(rng, vocab, n_keys)
  needles = vocab.needle(keys, values)
  tokens, weights, shown = [], [], 0
  while len(tokens) < length:
    if shown < n_keys and (shown == 0 or rng.random() < 0.3):
      tokens.append(needles[shown])
      weights.append(0.0)
      shown += 1
    else:
      i = rng.integers(0, shown)
      tokens += [keys[i], values[i]]
      weights += [0.0, 1.0]
  return np.array(tokens[:length], np.int32), np.array(weights[:length], np.float32)


def text_row(rng: np.random.Generator, vocab: RetrievalVocab, haystack: Haystack, length: int,
             needles: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [length], weights [length]): text carrying `needles` needles, each queried once later with its answer;
  weights are 1 on text, 0 on the needles (unpredictable) and the query keys, 1 on the answers."""
  keys, values = _pairs(rng, vocab, needles)
  text = haystack.cut(rng, length - 3 * needles)
  cuts = np.sort(rng.choice(np.arange(1, len(text)), 2 * needles, replace=False))
  # Each needle before its own query: pair the i-th smallest of a random half with the i-th of the other half.
  order = rng.permutation(2 * needles)
  firsts, seconds = np.sort(cuts[order[:needles]]), np.sort(cuts[order[needles:]])
  firsts, seconds = np.minimum(firsts, seconds), np.maximum(firsts, seconds)
  which = rng.permutation(needles)
  events = sorted([(int(c), i, 0) for c, i in zip(firsts, which)] + [(int(c), i, 1) for c, i in zip(seconds, which)])
  needle_tokens = vocab.needle(keys, values)
  tokens, weights, last = [], [], 0
  for cut, i, is_query in events:
    piece = [keys[i], values[i]] if is_query else [needle_tokens[i]]
    tokens += [text[last:cut], piece]
    weights += [np.ones(cut - last), [0.0, 1.0] if is_query else [0.0]]
    last = cut
  tokens.append(text[last:])
  weights.append(np.ones(len(text) - last))
  return np.concatenate(tokens).astype(np.int32), np.concatenate(weights).astype(np.float32)


def training_batch(rng: np.random.Generator, vocab: RetrievalVocab, haystack: Haystack, *, batch: int, length: int,
                   dense_share: float, needles: int, answer_weight: float) -> dict[str, np.ndarray]:
  """{"inputs", "targets", "mask"} [batch, length]: the first round(dense_share * batch) rows `dense_row`s (all
  n_keys keys each), the rest `text_row`s; the mask weighs retrieval answers `answer_weight`, text 1."""
  if not 0.0 <= dense_share <= 1.0:
    raise ValueError(f"training_batch: dense_share must be in [0, 1], got {dense_share}")
  rows, weights = [], []
  for r in range(batch):
    if r < round(dense_share * batch):
      row, weight = dense_row(rng, vocab, length + 1, vocab.n_keys)
    else:
      row, weight = text_row(rng, vocab, haystack, length + 1, needles)
    rows.append(row)
    weights.append(np.where(vocab.is_value(row), answer_weight * weight, weight))
  tokens, weights = np.stack(rows), np.stack(weights)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": weights[:, 1:].astype(np.float32)}
