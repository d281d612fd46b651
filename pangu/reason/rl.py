"""Stage 3 of Pangu Embedded: GRPO on verifiable tasks with MARS rewards, from a distilled chat student.

One step: draw prompts, sample G replies each with the decode engine at the policy's temperature
(`GRPOConfig.temperature`, the same in every log-prob; `distill.sample_replies`), score every reply with MARS
(`rewards.MARS`, through `reward_request`: the chat format's answer field goes to the maths source boxed for
`arith`, to the exact-match source for `list` / `string` / `exact`, to the sandbox fenced for `code`), drop
zero-variance groups and refill (`grpo.fill_groups`), recompute the behaviour and reference log-probs, and take one
step of the shared train step with `grpo.grpo_loss`. The reference is the student before RL. Every step logs what
tells whether RL can work: the sampled reward, the dropped groups, the KL to the reference, the gradient and update
norms, and how far the step moved the log-probs of the replies with positive and negative advantage.
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


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Sizes of a GRPO run.

  The defaults are what moved the quick distilled student of experiments/embedded_dual.py (greedy accuracy
  0.23 -> 0.32 in 40 steps at G = 8): at learning rate 1e-4 a step moved the replies' log-probs by ~0.005 nats and
  accuracy stayed flat; at 1e-3 (no warm-up) Adam's first, sign-like steps pushed the KL to the reference to
  ~0.25 nats a token with little reward to show for it.

  Attributes:
    steps: train steps (one batch of `prompts_per_step` informative groups each).
    prompts_per_step: groups per step; each holds `GRPOConfig.num_generations` replies.
    learning_rate: AdamW learning rate, constant after the warm-up.
    warmup_steps: linear warm-up from 0 (the first step's rate is 0).
    max_new_tokens, seq_len: the reply cap and the packed row length (prompt + reply must fit).
    mode: the chat mode the student answers in ("slow" or "fast").
    balance_families: draw each step's prompts evenly over the task families of the pool (`draw_prompts`) and
      fill the batch with an equal share of informative groups per family (`grpo.fill_groups(strata=)`), so that
      a family with more prompts or more often informative groups does not crowd the others out of the updates.
  """

  steps: int = 40
  prompts_per_step: int = 16
  learning_rate: float = 3e-4
  warmup_steps: int = 5
  max_new_tokens: int = 32
  seq_len: int = 96
  mode: str = "slow"
  balance_families: bool = True

  def __post_init__(self):
    for name in ("steps", "prompts_per_step", "max_new_tokens", "seq_len"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"RLConfig.{name} must be a positive int, got {getattr(self, name)!r}")
    if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f"RLConfig.warmup_steps must be an int in [0, steps={self.steps}), got {self.warmup_steps!r}")
    if not self.learning_rate > 0:
      raise ValueError(f"RLConfig.learning_rate must be > 0, got {self.learning_rate!r}")
    if self.mode not in ("slow", "fast"):
      raise ValueError(f"RLConfig.mode must be slow or fast, got {self.mode!r}")


def reward_request(task: tasks.Task, text: str, tokens: Sequence[int], fmt: chat.ChatFormat,
                   mode: str) -> rewards.RewardRequest:
  """The MARS request of one reply: `arith` goes to the maths source (the answer field boxed), `list`, `string`
  and `exact` to the exact-match source, `code` to the sandbox (the answer field fenced, each unit test an
  assert)."""
  parsed = chat.parse_response(text, fmt)
  answer, common = parsed.answer.strip(), dict(prompt=task.prompt, mode=mode, thinking=parsed.reasoning or None,
                                               closed=parsed.complete, tokens=tuple(tokens))
  if task.family == "code":
    fenced = answer if rewards.extract_code(answer) is not None or not answer else f"```python\n{answer}\n```"
    return rewards.RewardRequest(task="code", answer=fenced, tests=tuple(f"assert f({x}) == {y}"
                                                                        for x, y in task.tests), **common)
  if task.family == "arith":
    boxed = f"\\boxed{{{answer}}}" if parsed.complete and answer else parsed.answer
    return rewards.RewardRequest(task="math", answer=boxed, gold=task.answer, **common)
  return rewards.RewardRequest(task="exact", answer=parsed.answer, gold=task.answer, **common)


def draw_prompts(items: Sequence[tasks.Task], n: int, rng: np.random.Generator, *, balance: bool) -> np.ndarray:
  """n distinct indices into `items`; with `balance` split as evenly as possible over the families (in order of
  first appearance; the remainder goes to families drawn at random), each family's share drawn uniformly."""
  if n > len(items):
    raise ValueError(f"cannot draw {n} distinct prompts from {len(items)} items")
  if not balance:
    return rng.choice(len(items), n, replace=False)
  families = list(dict.fromkeys(t.family for t in items))
  pools = [np.flatnonzero([t.family == f for t in items]) for f in families]
  counts = np.full(len(families), n // len(families))
  counts[rng.choice(len(families), n % len(families), replace=False)] += 1
  short = [(f, len(p), c) for f, p, c in zip(families, pools, counts) if c > len(p)]
  if short:
    raise ValueError(f"balanced draw of {n} prompts needs more items of family {short[0][0]!r}: has {short[0][1]}, "
                     f"needs {short[0][2]}")
  return np.concatenate([rng.choice(p, c, replace=False) for p, c in zip(pools, counts)])


def family_diagnostics(families: Sequence[str], rewards: np.ndarray, advantages: np.ndarray | None = None,
                       tokens: np.ndarray | None = None) -> dict[str, dict]:
  """Per family [N] of groups with rewards [N, G], what decides whether its groups teach anything.

  {"groups", "reward" (mean), "reward_std" (mean within-group std), "mixed" (fraction of groups whose rewards
  differ: the only ones with a GRPO signal), "all_low" / "all_high" (equal rewards <= 0: every reply failed /
  > 0: every reply passed)}; with `advantages` [N, G] also "advantage_abs" (mean |A|), with `tokens` [N, G]
  (completion tokens per reply) "tokens" (mean per reply: a family's weight under token aggregation)."""
  rewards = np.asarray(rewards, np.float64)
  families = np.asarray(families)
  out = {}
  for f in dict.fromkeys(families.tolist()):
    r = rewards[families == f]
    flat = r.std(axis=1) == 0
    row = {"groups": int(len(r)), "reward": float(r.mean()), "reward_std": float(r.std(axis=1).mean()),
           "all_low": float(np.mean(flat & (r[:, 0] <= 0))), "all_high": float(np.mean(flat & (r[:, 0] > 0))),
           "mixed": float(np.mean(~flat))}
    if advantages is not None:
      row["advantage_abs"] = float(np.abs(np.asarray(advantages)[families == f]).mean())
    if tokens is not None:
      row["tokens"] = float(np.asarray(tokens)[families == f].mean())
    out[f] = row
  return out


def evaluate(model_config: TransformerConfig, params, items: Sequence[tasks.Task], tokenizer: ByteTokenizer,
             fmt: chat.ChatFormat, mars: Callable[[rewards.RewardRequest], rewards.MARSReward], *, mode: str,
             max_new_tokens: int, rng: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """Greedy replies to `items` -> (passed [N]: complete and correct by the task's own verifier, reward [N]: MARS)."""
  prompts = [chat.render_prompt(t.prompt, mode=mode, fmt=fmt) for t in items]
  replies = distill.sample_replies(model_config, params, prompts, tokenizer, fmt, max_new_tokens=max_new_tokens,
                                   rng=rng)
  scored = [mars(reward_request(t, text, tokenizer.encode(text), fmt, mode)).reward
            for t, text in zip(items, replies.texts)]
  return distill.pass_matrix(items, replies, 1, fmt)[:, 0], np.asarray(scored, np.float64)


def train_grpo(model_config: TransformerConfig, params, items: Sequence[tasks.Task], tokenizer: ByteTokenizer,
               fmt: chat.ChatFormat, rl: RLConfig, config: grpo.GRPOConfig,
               mars: Callable[[rewards.RewardRequest], rewards.MARSReward], *, seed: int = 0,
               log=print) -> tuple[dict, list[dict]]:
  """GRPO from `params` on `items` -> (the trained params, the per-step history).

  `mars` scores one reply (a `rewards.MARS`, or any scorer with its call signature). History per step: "reward"
  (mean over the trained groups), "sampled_reward" (over every generated group, dropped ones included), "loss",
  "dropped_groups", "generated_groups", "topped_up", "kl" (token mean to the reference), "grad_norm",
  "update_norm", "logp_shift_positive" / "logp_shift_negative" (mean token log-prob change the step made to
  the replies with positive / negative advantage), and "per_family": {family: `family_diagnostics` of every
  sampled group, plus "trained" (groups of the family in the batch) and "trained_reward"}.
  """
  g = config.num_generations
  mesh = single_device_mesh()
  train_config = TrainConfig(peak_lr=rl.learning_rate, end_lr=rl.learning_rate, warmup_steps=rl.warmup_steps,
                             total_steps=rl.steps, weight_decay=0.0)
  step = make_train_step(model_config, train_config, mesh, loss_fn=grpo.grpo_loss(model_config, config),
                         batch_axes=grpo.GRPO_BATCH_AXES)
  state = init_train_state(model_config, train_config, jax.random.key(seed), mesh)
  state = distill.reset_optimizer(state, make_optimizer(train_config), params)
  reference = jax.tree.map(np.asarray, jax.device_get(params))
  logprobs = grpo.sequence_logprobs_fn(model_config, config.temperature)
  rng, key = np.random.default_rng(seed), jax.random.key(seed + 1)
  drawn, drawn_families = [], []  # every generation batch of the current step, dropped groups included
  family_names = list(dict.fromkeys(t.family for t in items))

  def sample(_):
    nonlocal key
    key, sub = jax.random.split(key)
    chosen = [items[i] for i in draw_prompts(items, rl.prompts_per_step, rng, balance=rl.balance_families)]
    prompts = [chat.render_prompt(t.prompt, mode=rl.mode, fmt=fmt) for t in chosen for _ in range(g)]
    replies = distill.sample_replies(model_config, state.params, prompts, tokenizer, fmt,
                                     max_new_tokens=rl.max_new_tokens, rng=sub, temperature=config.temperature,
                                     batch=len(prompts))
    completions = [tokenizer.encode(text) for text in replies.texts]
    scored = [mars(reward_request(t, text, c, fmt, rl.mode)).reward
              for t, text, c in zip((t for t in chosen for _ in range(g)), replies.texts, completions)]
    packed = grpo.pack_rollouts([tokenizer.encode(p) for p in prompts], completions, rl.seq_len,
                                pad_id=tokenizer.pad_id)
    packed["behaviour"] = np.asarray(logprobs(state.params, packed["inputs"], packed["targets"]))
    packed["reference"] = np.asarray(logprobs(reference, packed["inputs"], packed["targets"]))
    groups = {k: v.reshape(rl.prompts_per_step, g, *v.shape[1:]) for k, v in packed.items()}
    drawn.append(np.asarray(scored, np.float32).reshape(rl.prompts_per_step, g))
    drawn_families.extend(t.family for t in chosen)
    family = np.asarray([family_names.index(t.family) for t in chosen])
    return {**groups, "rewards": drawn[-1], "family": family}

  history = []
  for t in range(rl.steps):
    drawn.clear()
    drawn_families.clear()
    groups, stats = grpo.fill_groups(sample, rl.prompts_per_step, config,
                                     strata="family" if rl.balance_families else None)
    rows = {k: v.reshape(-1, *v.shape[2:]) for k, v in groups.items() if k not in ("rewards", "family")}
    packed = {k: rows[k] for k in ("inputs", "targets", "mask")}
    batch = grpo.grpo_batch(packed, groups["rewards"], rows["behaviour"], rows["reference"], config)
    state, metrics = step(state, batch)
    # How far the step moved the log-probs of the trained replies, per reply (token mean): up for A > 0 and down
    # for A < 0 when the loss reaches the params.
    after = np.asarray(logprobs(state.params, packed["inputs"], packed["targets"]))
    tokens = np.maximum(packed["mask"].sum(axis=1), 1.0)
    shift = ((after - rows["behaviour"]) * packed["mask"]).sum(axis=1) / tokens
    advantages = batch["advantages"]
    trained_families = [family_names[i] for i in groups["family"]]
    per_family = family_diagnostics(drawn_families, np.concatenate(drawn))
    trained = family_diagnostics(trained_families, groups["rewards"], advantages.reshape(-1, g),
                                 packed["mask"].sum(axis=1).reshape(-1, g))
    for f, row in per_family.items():
      row.update({"trained": trained.get(f, {}).get("groups", 0), "trained_reward": trained.get(f, {}).get("reward"),
                  "advantage_abs": trained.get(f, {}).get("advantage_abs"), "tokens": trained.get(f, {}).get("tokens")})
    history.append({
        "reward": float(groups["rewards"].mean()), "sampled_reward": float(np.mean(drawn)),
        "loss": float(metrics["loss"]), "dropped_groups": stats.dropped, "generated_groups": stats.generated,
        "topped_up": stats.topped_up, "kl": float(metrics["kl"]), "grad_norm": float(metrics["grad_norm"]),
        "update_norm": float(metrics["update_norm"]),
        "logp_shift_positive": float(shift[advantages > 0].mean()) if np.any(advantages > 0) else 0.0,
        "logp_shift_negative": float(shift[advantages < 0].mean()) if np.any(advantages < 0) else 0.0,
        "per_family": per_family})
    h = history[-1]
    families_text = "; ".join(
        f"{f}: reward {r['reward']:.2f}, groups {r['groups']} (fail {r['all_low']:.2f} pass {r['all_high']:.2f} "
        f"mixed {r['mixed']:.2f}), trained {r['trained']}" + (f" |A| {r['advantage_abs']:.2f} tokens {r['tokens']:.0f}"
                                                             if r["trained"] else "")
        for f, r in per_family.items())
    log(f"GRPO step {t + 1}/{rl.steps}: sampled reward {h['sampled_reward']:.3f} (trained groups {h['reward']:.3f}), "
        f"dropped {stats.dropped}/{stats.generated} zero-variance groups, kl {h['kl']:.4f}, grad norm "
        f"{h['grad_norm']:.3f}, update norm {h['update_norm']:.4f}, log-prob shift A>0 "
        f"{h['logp_shift_positive']:+.4f} A<0 {h['logp_shift_negative']:+.4f}; {families_text}")
  return jax.device_get(state.params), history
