"""Stage 3 of Pangu Embedded: GRPO on verifiable tasks with MARS rewards, from a distilled chat student.

One step: draw prompts, sample G replies each with the decode engine at temperature 1 (`distill.sample_replies`),
score every reply with MARS (`rewards.MARS`; the chat format's answer field is the final answer, handed to the
maths source as its boxed answer), drop zero-variance groups and refill (`grpo.fill_groups`), recompute the
behaviour and reference log-probs, and take one step of the shared train step with `grpo.grpo_loss`. The
reference is the student before RL. Only the `arith` family has a MARS source among the toy tasks (its answers
are numbers); other families are refused by name.
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from pangu.data.tokenizer import ByteTokenizer
from pangu.models.config import TransformerConfig
from pangu.parallel.mesh import single_device_mesh
from pangu.reason import chat, distill, grpo, rewards, tasks
from pangu.train.config import TrainConfig
from pangu.train.optim import make_optimizer
from pangu.train.step import init_train_state, make_train_step

SUPPORTED_FAMILIES = ("arith",)


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Sizes of a GRPO run.

  Attributes:
    steps: train steps (one batch of `prompts_per_step` informative groups each).
    prompts_per_step: groups per step; each holds `GRPOConfig.num_generations` replies.
    learning_rate: constant AdamW learning rate.
    max_new_tokens, seq_len: the reply cap and the packed row length (prompt + reply must fit).
    mode: the chat mode the student answers in ("slow" or "fast").
  """

  steps: int = 20
  prompts_per_step: int = 8
  learning_rate: float = 1e-4
  max_new_tokens: int = 32
  seq_len: int = 96
  mode: str = "slow"

  def __post_init__(self):
    for name in ("steps", "prompts_per_step", "max_new_tokens", "seq_len"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"RLConfig.{name} must be a positive int, got {getattr(self, name)!r}")
    if not self.learning_rate > 0:
      raise ValueError(f"RLConfig.learning_rate must be > 0, got {self.learning_rate!r}")
    if self.mode not in ("slow", "fast"):
      raise ValueError(f"RLConfig.mode must be slow or fast, got {self.mode!r}")


def reward_request(task: tasks.Task, text: str, tokens: Sequence[int], fmt: chat.ChatFormat,
                   mode: str) -> rewards.RewardRequest:
  """The MARS request of one reply to an `arith` task."""
  if task.family not in SUPPORTED_FAMILIES:
    raise ValueError(f"no MARS source scores the {task.family!r} family; supported: {SUPPORTED_FAMILIES}")
  parsed = chat.parse_response(text, fmt)
  answer = f"\\boxed{{{parsed.answer.strip()}}}" if parsed.complete and parsed.answer.strip() else parsed.answer
  return rewards.RewardRequest(task="math", prompt=task.prompt, answer=answer, mode=mode,
                               thinking=parsed.reasoning or None, closed=parsed.complete, gold=task.answer,
                               tokens=tuple(tokens))


def accuracy(model_config: TransformerConfig, params, items: Sequence[tasks.Task], tokenizer: ByteTokenizer,
             fmt: chat.ChatFormat, *, mode: str, max_new_tokens: int, rng: jax.Array) -> np.ndarray:
  """[N] whether the greedy reply to each item is complete and correct (the task's own verifier)."""
  prompts = [chat.render_prompt(t.prompt, mode=mode, fmt=fmt) for t in items]
  replies = distill.sample_replies(model_config, params, prompts, tokenizer, fmt, max_new_tokens=max_new_tokens,
                                   rng=rng)
  return distill.pass_matrix(items, replies, 1, fmt)[:, 0]


def train_grpo(model_config: TransformerConfig, params, items: Sequence[tasks.Task], tokenizer: ByteTokenizer,
               fmt: chat.ChatFormat, rl: RLConfig, config: grpo.GRPOConfig,
               mars: Callable[[rewards.RewardRequest], rewards.MARSReward], *, seed: int = 0,
               log=print) -> tuple[dict, list[dict]]:
  """GRPO from `params` on `items` -> (the trained params, per step {"reward", "loss", "dropped_groups"}).

  `mars` scores one reply (a `rewards.MARS`, or any scorer with its call signature).
  """
  g = config.num_generations
  mesh = single_device_mesh()
  train_config = TrainConfig(peak_lr=rl.learning_rate, end_lr=rl.learning_rate, warmup_steps=0,
                             total_steps=rl.steps, weight_decay=0.0)
  step = make_train_step(model_config, train_config, mesh, loss_fn=grpo.grpo_loss(model_config, config),
                         batch_axes=grpo.GRPO_BATCH_AXES)
  state = init_train_state(model_config, train_config, jax.random.key(seed), mesh)
  state = distill.reset_optimizer(state, make_optimizer(train_config), params)
  reference = jax.tree.map(np.asarray, jax.device_get(params))
  logprobs = grpo.sequence_logprobs_fn(model_config)
  rng, key = np.random.default_rng(seed), jax.random.key(seed + 1)

  def sample(_):
    nonlocal key
    key, sub = jax.random.split(key)
    chosen = [items[i] for i in rng.choice(len(items), rl.prompts_per_step, replace=False)]
    prompts = [chat.render_prompt(t.prompt, mode=rl.mode, fmt=fmt) for t in chosen for _ in range(g)]
    replies = distill.sample_replies(model_config, state.params, prompts, tokenizer, fmt,
                                     max_new_tokens=rl.max_new_tokens, rng=sub, temperature=1.0,
                                     batch=len(prompts))
    completions = [tokenizer.encode(text) for text in replies.texts]
    scored = [mars(reward_request(t, text, c, fmt, rl.mode)).reward
              for t, text, c in zip((t for t in chosen for _ in range(g)), replies.texts, completions)]
    packed = grpo.pack_rollouts([tokenizer.encode(p) for p in prompts], completions, rl.seq_len,
                                pad_id=tokenizer.pad_id)
    packed["behaviour"] = np.asarray(logprobs(state.params, packed["inputs"], packed["targets"]))
    packed["reference"] = np.asarray(logprobs(reference, packed["inputs"], packed["targets"]))
    groups = {k: v.reshape(rl.prompts_per_step, g, *v.shape[1:]) for k, v in packed.items()}
    return {**groups, "rewards": np.asarray(scored, np.float32).reshape(rl.prompts_per_step, g)}

  history = []
  for t in range(rl.steps):
    groups, stats = grpo.fill_groups(sample, rl.prompts_per_step, config)
    rows = {k: v.reshape(-1, *v.shape[2:]) for k, v in groups.items() if k != "rewards"}
    packed = {k: rows[k] for k in ("inputs", "targets", "mask")}
    batch = grpo.grpo_batch(packed, groups["rewards"], rows["behaviour"], rows["reference"], config)
    state, metrics = step(state, batch)
    history.append({"reward": float(groups["rewards"].mean()), "loss": float(metrics["loss"]),
                    "dropped_groups": stats.dropped})
    log(f"GRPO step {t + 1}/{rl.steps}: mean reward {history[-1]['reward']:.3f}, loss {history[-1]['loss']:.4f}, "
        f"dropped {stats.dropped} zero-variance groups")
  return jax.device_get(state.params), history
