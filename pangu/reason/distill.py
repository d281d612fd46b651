"""Model-aware iterative distillation (Pangu Embedded, stage 1; spec 3b).

Per iteration t:
  1. Score: sample k slow-mode answers per prompt from G_{t-1} (`sample_replies`); the pass rate
     p_i = (1/k) sum_j verify(y_ij) gives the complexity C_i = 1 - p_i ("Eq. 1" [S]).
  2. Select: weight w_i = exp(-(C_i - mu)^2 / (2 sigma^2)) (Gaussian around mu = 0.5 [S]; sigma = 0.2 [U]) and
     draw N prompts without replacement with probability proportional to w (`select`); `uniform` is the ablation.
  3. Target: the shortest teacher candidate that passes both verification layers (`shortest_correct`); prompts
     with no correct candidate are dropped and counted.
  4. SFT from theta_{t-1}^merged with the shared train step: `lm_loss` over a batch whose mask covers only the
     reply (`sft_batch`), so the prompt is context, not target. The optimiser state is reset after each merge.
  5. Merge (`pangu.reason.merging.merge_iteration`); G_t is the merged model.
The loop itself is the experiment's (experiments/embedded_dual.py); every piece is here.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pangu.data.tokenizer import Tokenizer
from pangu.infer.decoding import GenerationConfig, decode_layout, generate
from pangu.infer.sampling import SamplingConfig
from pangu.models.config import TransformerConfig
from pangu.reason import chat, tasks, teacher
from pangu.reason.tasks import Task
from pangu.reason.teacher import Solution

SELECTIONS = ("gaussian", "uniform")
REPLY_WEIGHTINGS = ("token", "reply")  # how `sft_batch` weighs the loss: every reply token alike, every reply alike


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Attributes:
    samples: k, student samples per prompt to estimate the pass rate.
    mu, sigma: centre and width of the Gaussian selection weight over complexity.
    select: N, prompts kept per iteration.
    selection: "gaussian" (the paper's) or "uniform" (the ablation).
    band: optional hard filter (a, b): keep only a <= C <= b.
    drop_extremes: drop C == 0 and C == 1 before drawing.
    temperature: sampling temperature of the scoring samples.
  """

  samples: int = 8
  mu: float = 0.5
  sigma: float = 0.2
  select: int = 64
  selection: str = "gaussian"
  band: tuple[float, float] | None = None
  drop_extremes: bool = False
  temperature: float = 1.0

  def __post_init__(self):
    if self.samples < 1 or self.select < 1:
      raise ValueError(f"DistillConfig.samples and .select must be >= 1, got {self.samples!r}, {self.select!r}")
    if not self.sigma > 0:
      raise ValueError(f"DistillConfig.sigma must be > 0, got {self.sigma!r}")
    if self.selection not in SELECTIONS:
      raise ValueError(f"DistillConfig.selection must be one of {SELECTIONS}, got {self.selection!r}")
    if self.band is not None and not 0 <= self.band[0] <= self.band[1] <= 1:
      raise ValueError(f"DistillConfig.band must be (a, b) with 0 <= a <= b <= 1, got {self.band!r}")


def complexity(passed: np.ndarray) -> np.ndarray:
  """passed [N, k] (bool) -> C [N] = 1 - mean pass rate."""
  passed = np.asarray(passed, bool)
  if passed.ndim != 2 or passed.shape[1] == 0:
    raise ValueError(f"passed must be [N, k] with k >= 1, got shape {passed.shape}")
  return 1.0 - passed.mean(axis=1)


def selection_weights(c: np.ndarray, mu: float = 0.5, sigma: float = 0.2) -> np.ndarray:
  """w = exp(-(C - mu)^2 / (2 sigma^2)): 1 at C = mu."""
  return np.exp(-np.square(np.asarray(c, np.float64) - mu) / (2 * sigma ** 2))


def select(c: np.ndarray, config: DistillConfig, rng: np.random.Generator) -> np.ndarray:
  """Indices of the prompts to train on: after the band / extremes filters, min(N, eligible) drawn without
  replacement with probability proportional to the selection weight (uniform for the ablation)."""
  c = np.asarray(c, np.float64)
  eligible = np.ones(c.shape, bool)
  if config.band is not None:
    eligible &= (c >= config.band[0]) & (c <= config.band[1])
  if config.drop_extremes:
    eligible &= (c > 0) & (c < 1)
  weights = selection_weights(c, config.mu, config.sigma) if config.selection == "gaussian" else np.ones(c.shape)
  weights = np.where(eligible, weights, 0.0)
  # Gaussian weights of C in {0, 1} are tiny but positive; draw only among positive weights.
  n = min(config.select, int(np.count_nonzero(weights)))
  if n == 0:
    return np.zeros((0,), np.int64)
  return np.sort(rng.choice(c.size, n, replace=False, p=weights / weights.sum()))


def shortest_correct(task: Task, candidates: Sequence[Solution], tokenizer: Tokenizer,
                     fmt: chat.ChatFormat = chat.RELEASE_FORMAT) -> int | None:
  """Index of the shortest candidate (tokens of its rendered slow reply; ties: lowest index) that passes the
  final-answer check and the step check; None when none does."""
  best, best_length = None, None
  for i, candidate in enumerate(candidates):
    if not (tasks.verify(task, candidate.answer) and tasks.check_steps(task, candidate.reasoning)):
      continue
    length = len(tokenizer.encode(chat.render_response(candidate.reasoning, candidate.answer, mode="slow", fmt=fmt)))
    if best_length is None or length < best_length:
      best, best_length = i, length
  return best


def distillation_targets(items: Sequence[Task], rng: np.random.Generator, tokenizer: Tokenizer,
                         fmt: chat.ChatFormat = chat.RELEASE_FORMAT,
                         teacher_config: teacher.TeacherConfig = teacher.TeacherConfig()
                         ) -> tuple[list[Task], list[Solution], int]:
  """Rejection sampling from the teacher: (kept tasks, their shortest correct solutions, number dropped)."""
  kept, solutions, dropped = [], [], 0
  for task in items:
    drawn = teacher.candidates(task, rng, teacher_config)
    index = shortest_correct(task, drawn, tokenizer, fmt)
    if index is None:
      dropped += 1
    else:
      kept.append(task)
      solutions.append(drawn[index])
  return kept, solutions, dropped


def sft_batch(tokenizer: Tokenizer, prompts: Sequence[str], replies: Sequence[str], seq_len: int,
              pad_id: int | None = None, weighting: str = "token",
              length_multiple: int | None = None) -> dict[str, np.ndarray]:
  """Prompt + reply pairs -> the `lm_loss` batch (inputs, targets [B, seq_len] int32, mask float32) with the
  mask on the reply's tokens only. A pair longer than seq_len + 1 tokens is an error, never truncated.

  weighting="token" weighs every reply token alike, so a family with long replies (code) takes most of the
  gradient; "reply" scales each row's mask to (mean reply length / its length), so the loss is the mean over
  replies of each reply's mean token loss while the mask still sums to the batch's reply tokens.

  length_multiple: when set, the batch is [B, L] with L the smallest multiple of it that holds the batch's
  longest pair (at most seq_len). The columns dropped are padding under a zero mask that no earlier position
  attends to (the decoder is causal), so the loss and its gradient are unchanged, and a step compiled once per
  length bucket does not spend most of its compute on the padding of short replies."""
  if len(prompts) != len(replies):
    raise ValueError(f"got {len(prompts)} prompts and {len(replies)} replies")
  if weighting not in REPLY_WEIGHTINGS:
    raise ValueError(f"weighting must be one of {REPLY_WEIGHTINGS}, got {weighting!r}")
  if length_multiple is not None and length_multiple < 1:
    raise ValueError(f"length_multiple must be None or >= 1, got {length_multiple!r}")
  pad_id = tokenizer.pad_id if pad_id is None else pad_id
  inputs = np.full((len(prompts), seq_len), pad_id, np.int32)
  targets = np.full((len(prompts), seq_len), pad_id, np.int32)
  mask = np.zeros((len(prompts), seq_len), np.float32)
  longest = 1
  for row, (prompt, reply) in enumerate(zip(prompts, replies)):
    p, r = tokenizer.encode(prompt), tokenizer.encode(reply)
    tokens = np.concatenate([p, r])
    if len(tokens) > seq_len + 1:
      raise ValueError(f"example {row} has {len(tokens)} tokens, more than seq_len + 1 = {seq_len + 1}: "
                       f"{(prompt + reply)[:80]!r}")
    inputs[row, :len(tokens) - 1] = tokens[:-1]
    targets[row, :len(tokens) - 1] = tokens[1:]
    mask[row, len(p) - 1:len(tokens) - 1] = 1.0
    longest = max(longest, len(tokens) - 1)
  if weighting == "reply":
    lengths = mask.sum(axis=1, keepdims=True)
    mask *= lengths.mean() / np.maximum(lengths, 1.0)  # an empty reply's row stays all zero
  width = seq_len if length_multiple is None else min(seq_len, length_multiple * -(-longest // length_multiple))
  return {"inputs": inputs[:, :width], "targets": targets[:, :width], "mask": mask[:, :width]}


@dataclasses.dataclass(frozen=True)
class Replies:
  """Generated replies: texts [n], token counts [n] (every generated token, the stop token included), and
  `truncated` [n] (hit max_new_tokens without a stop token)."""

  texts: list[str]
  tokens: np.ndarray
  truncated: np.ndarray


def sample_replies(model_config: TransformerConfig, params, prompts: Sequence[str], tokenizer: Tokenizer,
                   fmt: chat.ChatFormat, *, max_new_tokens: int, rng: jax.Array, temperature: float = 0.0,
                   batch: int = 256) -> Replies:
  """Continues each prompt with the decode engine (greedy at temperature 0), in fixed-size batches so that
  every call of one shape reuses one compile. The reply stops at the format's end marker."""
  end = tokenizer.encode(fmt.turn_end)
  if len(end) != 1:
    raise ValueError(f"the end marker {fmt.turn_end!r} must be one token, got {len(end)}")
  gen = GenerationConfig(max_new_tokens=max_new_tokens, sampling=SamplingConfig(temperature=temperature),
                         stop_tokens=(int(end[0]),), pad_id=tokenizer.pad_id)
  config, params = decode_layout(model_config, params)
  encoded = [tokenizer.encode(p).tolist() for p in prompts]
  texts, lengths = [], []
  for start in range(0, len(encoded), batch):
    chunk = encoded[start:start + batch]
    padded = chunk + [chunk[-1]] * (batch - len(chunk))
    rng, key = jax.random.split(rng)
    outputs = generate(config, params, padded, gen, key)[:len(chunk)]
    for o in outputs:
      text = tokenizer.decode(o)
      # A tokenizer that skips special tokens drops the end marker; put it back so parsing sees the reply ended.
      stopped = len(o) > 0 and o[-1] == end[0]
      texts.append(text + fmt.turn_end if stopped and not text.endswith(fmt.turn_end) else text)
    lengths += [len(o) for o in outputs]
  lengths = np.asarray(lengths)
  stopped = np.asarray([t.endswith(fmt.turn_end) for t in texts])
  return Replies(texts, lengths, (lengths >= max_new_tokens) & ~stopped)


def pass_matrix(items: Sequence[Task], replies: Replies, samples: int, fmt: chat.ChatFormat,
                mode: str | None = None) -> np.ndarray:
  """[N, k] whether reply j of item i (replies ordered item-major) has a complete, correct final answer. With
  mode="fast" a reply that reasons (a non-empty span) fails: a fast pass rate must measure answering directly,
  or auto labels would call an item easy because the model reasoned its way through it."""
  passed = [parsed.complete and tasks.verify(task, parsed.answer) and (mode != "fast" or parsed.mode == "fast")
            for task, text in zip((t for t in items for _ in range(samples)), replies.texts)
            for parsed in [chat.parse_response(text, fmt)]]
  return np.asarray(passed, bool).reshape(len(items), samples)


def score(model_config: TransformerConfig, params, items: Sequence[Task], tokenizer: Tokenizer,
          fmt: chat.ChatFormat, *, samples: int, mode: str, max_new_tokens: int, rng: jax.Array,
          temperature: float = 1.0) -> np.ndarray:
  """Complexity C [N] of each item for the current student in `mode`, from `samples` sampled replies."""
  prompts = [chat.render_prompt(t.prompt, mode=mode, fmt=fmt) for t in items for _ in range(samples)]
  replies = sample_replies(model_config, params, prompts, tokenizer, fmt, max_new_tokens=max_new_tokens, rng=rng,
                           temperature=temperature)
  return complexity(pass_matrix(items, replies, samples, fmt, mode))


def reset_optimizer(state, tx, params):
  """The train state continued from `params` (a merged model) with a fresh optimiser state and step count:
  Adam moments of the pre-merge weights would push the merged weights back. The state gets its own copy of
  `params`, since the train step donates its state."""
  params = jax.tree.map(jnp.copy, params)
  return state.replace(params=params, opt_state=tx.init(params), step=jnp.zeros_like(state.step))
