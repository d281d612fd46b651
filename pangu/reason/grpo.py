"""GRPO as a loss of the shared train step (spec 3d; names and defaults follow google/tunix `GRPOConfig`).

Per prompt, G completions are sampled with the shared decode engine (`pangu.infer.decoding.generate`) and scored.
Dimension letters: B rows (groups x G), S tokens, V vocab, N groups, G generations per group.

1. Advantages per group: `A_i = (r_i - mean(r)) / (std(r; ddof=1) + eps)`; Dr. GRPO (`done_right`) drops the std.
2. Token ratio `rho = exp(logp_theta - logp_old)` and the clipped surrogate
   `l = -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon) A) * w + beta * KL`, where w is the stop-gradient
   truncated importance weight `min(exp(logp_prox - logp_behaviour), c)` of stale samples (1 when on-policy).
3. KL is k3 (`low_var_kl`) to a frozen reference: `exp(d) - d - 1` with `d = logp_ref - logp_theta`.
4. Aggregation: "token" (tunix "grpo"): `sum(mask * l) / sum(mask)` over the batch; "sequence_mean": the mean over
   rows of each row's token mean. Dr. GRPO divides `sum(mask * l)` by the constant B * S instead, so neither
   length nor the number of valid tokens rescales a row's gradient.
5. Zero-variance groups (all rewards equal: no signal) are dropped and refilled from new generation batches
   (DAPO dynamic sampling), up to `max_gen_batches`.

`grpo_loss(model_config, grpo_config)` is a `pangu.train.losses.LossFn` over `GRPO_BATCH_AXES`; pass both to
`pangu.train.step.make_train_step(loss_fn=, batch_axes=)`, which jits and shards it like any other loss. The data
path: `sample_groups` (decode engine) -> rewards (`pangu.reason.rewards.MARS`) -> `fill_groups` -> `pack_rollouts`
-> log-probs (`sequence_logprobs_fn`: behaviour, reference, proximal) -> `grpo_batch`.
"""

import dataclasses
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pangu.infer.decoding import GenerationConfig, generate
from pangu.models.config import TransformerConfig
from pangu.models.transformer import Decoder
from pangu.parallel import rules
from pangu.train.losses import Batch, BatchAxes, LossFn, Metrics

# inputs / targets / mask / old_logp / ref_logp / is_weight [B, S]; advantages [B].
GRPO_BATCH_AXES: BatchAxes = MappingProxyType({
    "inputs": (rules.BATCH, rules.LENGTH),
    "targets": (rules.BATCH, rules.LENGTH),
    "mask": (rules.BATCH, rules.LENGTH),
    "old_logp": (rules.BATCH, rules.LENGTH),
    "ref_logp": (rules.BATCH, rules.LENGTH),
    "is_weight": (rules.BATCH, rules.LENGTH),
    "advantages": (rules.BATCH,),
})


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """GRPO hyperparameters.

  Attributes:
    num_generations: G, completions per prompt (tunix default 2; experiments use 8, spec 3d).
    beta: weight of the k3 KL to the reference.
    epsilon: ratio clip range [1 - epsilon, 1 + epsilon].
    aggregation: "token" or "sequence_mean" (ignored under done_right, which uses the constant B * S).
    done_right: Dr. GRPO: advantages without the std, loss normalised by the constant B * S.
    advantage_eps: added to the group std.
    filter_zero_variance: drop groups whose rewards are all equal and refill (on by default).
    max_gen_batches: most generation batches `fill_groups` draws to fill one training batch.
    importance_weight_cap: c of the truncated importance weight min(exp(logp_prox - logp_behaviour), c).
    temperature: the policy is softmax(logits / temperature): rollouts are sampled from it and every log-prob
      (behaviour, reference, the loss's) is taken from it, so ratios stay on-policy. Below 1 the rollouts sit
      closer to the greedy reply that evaluation scores; greedy decoding is the same at any temperature.
  """
  num_generations: int = 2
  beta: float = 0.04
  epsilon: float = 0.2
  aggregation: Literal["token", "sequence_mean"] = "token"
  done_right: bool = False
  advantage_eps: float = 1e-4
  filter_zero_variance: bool = True
  max_gen_batches: int = 4
  importance_weight_cap: float = 2.0
  temperature: float = 1.0

  def __post_init__(self):
    if self.num_generations < 2:
      raise ValueError(f"GRPOConfig.num_generations must be >= 2 (a group needs a spread), got "
                       f"{self.num_generations}")
    if self.beta < 0:
      raise ValueError(f"GRPOConfig.beta must be >= 0, got {self.beta}")
    if not 0 < self.epsilon < 1:
      raise ValueError(f"GRPOConfig.epsilon must be in (0, 1), got {self.epsilon}")
    if self.aggregation not in ("token", "sequence_mean"):
      raise ValueError(f"GRPOConfig.aggregation must be token or sequence_mean, got {self.aggregation!r}")
    if self.advantage_eps <= 0:
      raise ValueError(f"GRPOConfig.advantage_eps must be > 0, got {self.advantage_eps}")
    if self.max_gen_batches < 1:
      raise ValueError(f"GRPOConfig.max_gen_batches must be >= 1, got {self.max_gen_batches}")
    if not self.temperature > 0:
      raise ValueError(f"GRPOConfig.temperature must be > 0, got {self.temperature}")
    if self.importance_weight_cap < 1:
      raise ValueError(f"GRPOConfig.importance_weight_cap must be >= 1, got {self.importance_weight_cap}")


def group_advantages(rewards: jax.Array, *, done_right: bool = False, eps: float = 1e-4) -> jax.Array:
  """[N, G] rewards -> [N, G] advantages (step 1)."""
  chex.assert_rank(rewards, 2)
  centred = rewards - rewards.mean(axis=1, keepdims=True)
  if done_right:
    return centred
  return centred / (rewards.std(axis=1, ddof=1, keepdims=True) + eps)


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
  """[B, S, V] logits, [B, S] targets -> [B, S] float32 log pi(target), pi = softmax(logits / temperature)."""
  chex.assert_rank(logits, 3)
  chex.assert_equal_shape_prefix((logits, targets), 2)
  logits = logits.astype(jnp.float32) / temperature
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(d) - d - 1, d = ref - theta (step 3); >= 0."""
  delta = ref_logp - logp
  return jnp.exp(delta) - delta - 1


def truncated_importance_weights(logp_prox: jax.Array, logp_behaviour: jax.Array, cap: float) -> jax.Array:
  """Stop-gradient min(exp(logp_prox - logp_behaviour), cap): corrects stale (off-policy) tokens."""
  return jax.lax.stop_gradient(jnp.minimum(jnp.exp(logp_prox - logp_behaviour), cap))


def grpo_objective(logp: jax.Array, batch: Batch, config: GRPOConfig) -> tuple[jax.Array, Metrics]:
  """The GRPO loss from [B, S] policy log-probs and a batch laid out as GRPO_BATCH_AXES (steps 2-4).

  Metrics: pg_loss, kl (token mean), clip_fraction (tokens whose clipped term was taken), ratio (token mean),
  tokens (unmasked completion tokens).
  """
  mask = batch["mask"].astype(jnp.float32)
  chex.assert_equal_shape((logp, mask, batch["old_logp"], batch["ref_logp"], batch["is_weight"]))
  chex.assert_shape(batch["advantages"], (logp.shape[0],))
  advantages = batch["advantages"][:, None].astype(jnp.float32)
  ratio = jnp.exp(logp - batch["old_logp"])
  clipped = jnp.clip(ratio, 1 - config.epsilon, 1 + config.epsilon)
  surrogate = jnp.minimum(ratio * advantages, clipped * advantages)
  pg = -surrogate * batch["is_weight"]
  kl = k3_kl(logp, batch["ref_logp"])
  per_token = pg + config.beta * kl
  tokens = mask.sum()
  token_mean = lambda x: (x * mask).sum() / jnp.maximum(tokens, 1.0)  # noqa: E731
  if config.done_right:
    loss = (per_token * mask).sum() / mask.size
  elif config.aggregation == "token":
    loss = token_mean(per_token)
  else:
    loss = ((per_token * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)).mean()
  metrics = {"pg_loss": token_mean(pg), "kl": token_mean(kl), "ratio": token_mean(ratio),
             "clip_fraction": token_mean((clipped * advantages < ratio * advantages).astype(jnp.float32)),
             "tokens": tokens}
  return loss, metrics


def grpo_loss(model_config: TransformerConfig, config: GRPOConfig) -> LossFn:
  """The GRPO `LossFn` for `make_train_step(loss_fn=grpo_loss(...), batch_axes=GRPO_BATCH_AXES)`."""
  model = Decoder(model_config)

  def loss_fn(params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
    del rng
    logp = token_logprobs(model.apply({"params": params}, batch["inputs"]), batch["targets"], config.temperature)
    return grpo_objective(logp, batch, config)

  return loss_fn


def sequence_logprobs_fn(model_config: TransformerConfig,
                         temperature: float = 1.0) -> Callable[[dict, jax.Array, jax.Array], jax.Array]:
  """A jitted (params, inputs [B, S], targets [B, S]) -> [B, S] log-probs of softmax(logits / temperature):
  behaviour, proximal or reference (pass `GRPOConfig.temperature`, the loss's)."""
  model = Decoder(model_config)
  return jax.jit(lambda params, inputs, targets: token_logprobs(model.apply({"params": params}, inputs), targets,
                                                                temperature))


def sample_groups(model_config: TransformerConfig, params: dict, prompts: Sequence[Sequence[int]],
                  gen: GenerationConfig, rng: jax.Array, num_generations: int) -> list[list[np.ndarray]]:
  """G completions per prompt from the shared decode engine, one generate call for all rows.

  Sample at `GRPOConfig.temperature` without top-k / top-p, so that log-probs recomputed by the policy at that
  temperature are the behaviour log-probs (spec pitfall "log-prob mismatch").
  """
  rows = [prompt for prompt in prompts for _ in range(num_generations)]
  completions = generate(model_config, params, rows, gen, rng)
  return [completions[i * num_generations:(i + 1) * num_generations] for i in range(len(prompts))]


def pack_rollouts(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], seq_len: int,
                  pad_id: int = 0) -> dict[str, np.ndarray]:
  """Prompt + completion per row, right-padded: inputs / targets / mask [B, seq_len], mask on completion targets.

  A row longer than seq_len + 1 tokens is an error (it would otherwise be silently cut).
  """
  if len(prompts) != len(completions):
    raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
  rows = np.full((len(prompts), seq_len + 1), pad_id, np.int32)
  mask = np.zeros((len(prompts), seq_len), np.float32)
  for row, (prompt, completion) in enumerate(zip(prompts, completions)):
    if not len(prompt) or not len(completion):
      raise ValueError(f"row {row} has an empty prompt or completion")
    tokens = np.concatenate([np.asarray(prompt), np.asarray(completion)])
    if len(tokens) > seq_len + 1:
      raise ValueError(f"row {row} has {len(tokens)} tokens, over seq_len + 1 = {seq_len + 1}")
    rows[row, :len(tokens)] = tokens
    mask[row, len(prompt) - 1:len(tokens) - 1] = 1.0  # targets that are completion tokens
  return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "mask": mask}


def grpo_batch(packed: dict[str, np.ndarray], rewards: np.ndarray, behaviour_logp: np.ndarray,
               ref_logp: np.ndarray, config: GRPOConfig, *, prox_logp: np.ndarray | None = None) -> Batch:
  """The train-step batch (GRPO_BATCH_AXES) from `pack_rollouts` rows (group-major: row n * G + g) and the
  rewards [N, G].

  Off-policy correction: by default the ratio is taken against the behaviour log-probs (`old_logp`) with unit
  weights. With `prox_logp` (the learner's log-probs before this step; AReaL's decoupled objective) the ratio is
  clipped against pi_prox and each token is weighted by min(exp(logp_prox - logp_behaviour), c). When the sample
  is on-policy (prox == behaviour) both are the same batch.
  """
  rewards = np.asarray(rewards, np.float32)
  rows = packed["inputs"].shape[0]
  if rewards.ndim != 2 or rewards.shape[1] != config.num_generations or rewards.size != rows:
    raise ValueError(f"rewards of shape {rewards.shape} do not match {rows} rows in groups of "
                     f"{config.num_generations}")
  for name, value in (("behaviour_logp", behaviour_logp), ("ref_logp", ref_logp), ("prox_logp", prox_logp)):
    if value is not None and np.shape(value) != packed["mask"].shape:
      raise ValueError(f"{name} has shape {np.shape(value)}, expected {packed['mask'].shape}")
  advantages = np.asarray(group_advantages(jnp.asarray(rewards), done_right=config.done_right,
                                           eps=config.advantage_eps)).reshape(-1)
  if prox_logp is None:
    old_logp, is_weight = behaviour_logp, np.ones(packed["mask"].shape, np.float32)
  else:
    old_logp = prox_logp
    is_weight = np.asarray(truncated_importance_weights(jnp.asarray(prox_logp), jnp.asarray(behaviour_logp),
                                                        config.importance_weight_cap))
  return {**packed, "old_logp": np.asarray(old_logp, np.float32), "ref_logp": np.asarray(ref_logp, np.float32),
          "is_weight": np.asarray(is_weight, np.float32), "advantages": advantages.astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class FillStats:
  """What `fill_groups` drew: generation batches, groups generated, zero-variance groups dropped, groups topped up
  from the dropped ones when `max_gen_batches` ran out, and informative groups left over past `num_groups`."""
  gen_batches: int
  generated: int
  dropped: int
  topped_up: int
  surplus: int

  @property
  def drop_fraction(self) -> float:
    return self.dropped / max(self.generated, 1)


def _take(groups: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
  return {key: value[index] for key, value in groups.items()}


def balanced_order(labels: Sequence, num: int) -> np.ndarray:
  """The first `num` indices of `labels` taken round robin over its distinct labels (in order of first appearance,
  each label's indices in order): every label gets an equal share where it has enough, the others fill the rest."""
  labels = np.asarray(labels)
  queues = [np.flatnonzero(labels == label) for label in dict.fromkeys(labels.tolist())]
  order = [q[r] for r in range(max((len(q) for q in queues), default=0)) for q in queues if r < len(q)]
  return np.asarray(order[:num], np.int64)


def fill_groups(sample: Callable[[int], dict[str, np.ndarray]], num_groups: int, config: GRPOConfig, *,
                strata: str | None = None) -> tuple[dict[str, np.ndarray], FillStats]:
  """Draws generation batches `sample(i)` until `num_groups` groups with nonzero reward variance are kept (step 5).

  `sample(i)` returns arrays whose leading axis is the group, including "rewards" [n, G]. Without filtering the
  first batches are taken as they come. When `max_gen_batches` runs out first, the batch is topped up with
  dropped groups (zero advantage: they add only the KL term), so the train step keeps one static shape; the
  count is reported.

  `strata` names a key of `sample`'s output that labels each group (a task family): then drawing goes on until
  every label seen has its equal share of informative groups (or `max_gen_batches` runs out), and the batch takes
  them round robin over the labels (`balanced_order`), so a label whose groups are more often informative does
  not crowd the others out of the update.
  """
  kept, dropped = [], []
  generated = gen_batches = 0

  def full() -> bool:
    if not kept:
      return False
    if strata is None:
      return sum(len(k["rewards"]) for k in kept) >= num_groups
    seen = np.concatenate([k[strata] for k in kept + dropped])
    have = np.concatenate([k[strata] for k in kept])
    labels = list(dict.fromkeys(seen.tolist()))
    return all(np.sum(have == label) >= num_groups // len(labels) for label in labels) and len(have) >= num_groups

  while not full() and gen_batches < config.max_gen_batches:
    groups = sample(gen_batches)
    rewards = np.asarray(groups["rewards"])
    if rewards.ndim != 2 or rewards.shape[1] != config.num_generations:
      raise ValueError(f"sample({gen_batches}) gave rewards of shape {rewards.shape}, expected "
                       f"[groups, {config.num_generations}]")
    if strata is not None and strata not in groups:
      raise ValueError(f"sample({gen_batches}) gave no {strata!r} (the strata key)")
    gen_batches, generated = gen_batches + 1, generated + len(rewards)
    informative = rewards.std(axis=1) > 0 if config.filter_zero_variance else np.ones(len(rewards), bool)
    kept.append(_take(groups, np.flatnonzero(informative)))
    dropped.append(_take(groups, np.flatnonzero(~informative)))
  pool = {key: np.concatenate([k[key] for k in kept]) for key in kept[0]}
  if strata is not None:
    pool = _take(pool, balanced_order(pool[strata], len(pool["rewards"])))
  topped_up = max(0, num_groups - len(pool["rewards"]))
  if topped_up:
    spare = {key: np.concatenate([d[key] for d in dropped]) for key in dropped[0]}
    if len(spare["rewards"]) < topped_up:
      raise ValueError(f"{config.max_gen_batches} generation batches gave {generated} groups, fewer than "
                       f"num_groups={num_groups}")
    pool = {key: np.concatenate([pool[key], spare[key][:topped_up]]) for key in pool}
  stats = FillStats(gen_batches=gen_batches, generated=generated,
                    dropped=sum(len(d["rewards"]) for d in dropped), topped_up=topped_up,
                    surplus=max(0, len(pool["rewards"]) - num_groups))
  return _take(pool, np.arange(num_groups)), stats
