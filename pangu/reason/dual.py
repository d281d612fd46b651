"""The dual system (Pangu Embedded, stage 2): fusion of fast and slow data, the auto-mode labels, and
repetition self-repair at decode time.

  - Fusion training: one model learns both reply formats from one data mix; the mode switch in the prompt
    (`pangu.reason.chat`) selects which format it writes.
  - Auto mode ("complexity-aware" [C]): the reply opens with the model's own mode choice. Its label comes from
    the current model's pass rates (`auto_labels`): fast when fast mode already solves the item at least
    `fast_threshold` of the time (the spec's rule); under the "relative" rule also where fast mode solves it
    at all and at least as often as slow mode, since thinking buys nothing there (for a student whose sampled
    fast pass rates stay under the threshold on items it answers well greedily).
  - Repetition self-repair [S]: local n-gram loop detection (`find_repetition`: an n-gram of 4..32 tokens
    repeated 3+ times in a row), then the loop is cut after its first copy and a control string is injected
    (by default the close-reasoning marker, which makes the model answer) before decoding continues.
"""

from collections.abc import Sequence

import jax
import numpy as np

from pangu.data.tokenizer import Tokenizer
from pangu.models.config import TransformerConfig
from pangu.reason import chat
from pangu.reason.distill import Replies, sample_replies
from pangu.reason.tasks import Task
from pangu.reason.teacher import Solution


AUTO_LABEL_RULES = ("absolute", "relative")


def auto_labels(fast_pass_rate: np.ndarray, fast_threshold: float = 0.5,
                slow_pass_rate: np.ndarray | None = None) -> list[str]:
  """Per item "fast" if fast mode passes at least `fast_threshold` of the time; given `slow_pass_rate` (the
  relative rule) also if fast mode passes at all and at least as often as slow mode; else "slow"."""
  if not 0 < fast_threshold <= 1:
    raise ValueError(f"fast_threshold must be in (0, 1], got {fast_threshold!r}")
  fast = np.asarray(fast_pass_rate, np.float64)
  chosen = fast >= fast_threshold
  if slow_pass_rate is not None:
    slow = np.asarray(slow_pass_rate, np.float64)
    if slow.shape != fast.shape:
      raise ValueError(f"slow_pass_rate has shape {slow.shape}, fast_pass_rate {fast.shape}")
    chosen |= (fast > 0) & (fast >= slow)
  return ["fast" if c else "slow" for c in chosen]


def fusion_examples(items: Sequence[Task], solutions: Sequence[Solution], labels: Sequence[str] | None,
                    fmt: chat.ChatFormat) -> list[tuple[str, str]]:
  """(prompt, reply) pairs: every item in slow and in fast mode, and, with `labels`, in auto mode replying in
  the labelled mode after its tag."""
  if len(items) != len(solutions) or (labels is not None and len(labels) != len(items)):
    raise ValueError(f"got {len(items)} items, {len(solutions)} solutions and "
                     f"{None if labels is None else len(labels)} labels")
  pairs = []
  for i, (task, solution) in enumerate(zip(items, solutions)):
    for mode in ("slow", "fast"):
      pairs.append((chat.render_prompt(task.prompt, mode=mode, fmt=fmt),
                    chat.render_response(solution.reasoning, solution.answer, mode=mode, fmt=fmt)))
    if labels is not None:
      pairs.append((chat.render_prompt(task.prompt, mode="auto", fmt=fmt),
                    chat.render_response(solution.reasoning, solution.answer, mode="auto", fmt=fmt,
                                         chosen=labels[i])))
  return pairs


def find_repetition(tokens: Sequence[int], min_n: int = 4, max_n: int = 32, repeats: int = 3) -> tuple[int, int] | None:
  """(start, n) of the earliest loop: an n-gram (min_n <= n <= max_n) occurring `repeats` times back to back
  from `start`; the smallest n wins at a given start. None when there is no loop."""
  x = np.asarray(tokens)
  for start in range(len(x)):
    for n in range(min_n, max_n + 1):
      end = start + n * repeats
      if end > len(x):
        break
      if all(np.array_equal(x[start:start + n], x[start + r * n:start + (r + 1) * n]) for r in range(1, repeats)):
        return start, n
  return None


def self_repair(model_config: TransformerConfig, params, prompts: Sequence[str], tokenizer: Tokenizer,
                fmt: chat.ChatFormat, *, max_new_tokens: int, rng: jax.Array, control: str | None = None,
                min_n: int = 4, max_n: int = 32, repeats: int = 3) -> tuple[Replies, np.ndarray]:
  """Generates replies; where one loops, keeps it up to the end of the loop's first copy, appends the control
  string (default: `fmt.think_close`) and continues within the same total budget of max_new_tokens.
  Returns the replies (lengths count every generated token plus the control string's) and which rows were
  repaired."""
  control = fmt.think_close if control is None else control
  first = sample_replies(model_config, params, prompts, tokenizer, fmt, max_new_tokens=max_new_tokens, rng=rng)
  texts, lengths, truncated = list(first.texts), first.tokens.copy(), first.truncated.copy()
  repaired = np.zeros(len(prompts), bool)
  retry, kept = [], []
  for i, text in enumerate(first.texts):
    ids = tokenizer.encode(text)
    loop = find_repetition(ids, min_n, max_n, repeats)
    if loop is not None:
      prefix = tokenizer.decode(ids[:loop[0] + loop[1]]) + control
      if len(tokenizer.encode(prefix)) < max_new_tokens:
        retry.append(i)
        kept.append(prefix)
  if retry:
    used = max(len(tokenizer.encode(p)) for p in kept)
    second = sample_replies(model_config, params, [prompts[i] + p for i, p in zip(retry, kept)], tokenizer, fmt,
                            max_new_tokens=max_new_tokens - used, rng=jax.random.fold_in(rng, 1))
    for j, i in enumerate(retry):
      texts[i] = kept[j] + second.texts[j]
      lengths[i] = len(tokenizer.encode(kept[j])) + second.tokens[j]
      truncated[i] = second.truncated[j]
      repaired[i] = True
  return Replies(texts, lengths, truncated), repaired
