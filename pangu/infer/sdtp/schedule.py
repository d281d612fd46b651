"""Where SDTP prunes and how many tokens each stage keeps, and the rule that picks them.

Spec shared/specs/sdtp.md 3.1 and 3.6: S stages, each before a chosen layer, each keeping a fraction r of the
prompt tokens still alive (cumulative keep r^s). The first `sink_tokens` tokens (attention sinks) and the most
recent ceil(recent_fraction * N) prompt tokens are always kept and count towards the keep count; tokens after
the prompt (a training target or generated tokens) are never pruned.

Tokens are identified by their RoPE position: a negative position marks a padding slot or (in training) a token
dropped by an earlier stage, which is never kept ahead of a live one.
"""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp

from pangu.config_checks import positive_ints

# The paper's schedule on a 32-layer model: 10 stages from layer 4, every 3 layers, each keeping 0.9.
PAPER_DEPTH, PAPER_FIRST_LAYER, PAPER_LAYER_STEP, PAPER_STAGES, PAPER_KEEP = 32, 4, 3, 10, 0.9
RANK_PAIR_WEIGHTS = ("uniform", "target_gap")


@dataclasses.dataclass(frozen=True)
class SDTPConfig:
  """A pruning schedule.

  Attributes:
    layers: strictly increasing layer indices >= 1; stage s runs its predictor on the input of layers[s] and keeps
      round(keep_ratio^(s+1) * N) of the N prompt tokens.
    keep_ratio: fraction of the surviving prompt tokens each stage keeps, in (0, 1].
    sink_tokens: first tokens always kept (attention sinks).
    recent_fraction: the most recent ceil(recent_fraction * N) prompt tokens are always kept; the last prompt
      token always is, whatever the fraction, since the next token is predicted from it.
    hidden: predictor hidden width; None is D / 4 (E-RECAP's choice; the paper does not say).
    saliency_reduce: per-token reduction of gradient x input over D: "abs_sum" |sum_d x g| (spec), "signed_sum"
      sum_d x g (E-RECAP), "l2" ||x g||.
    gumbel_tau: Gumbel-softmax temperature of the training masks.
    rank_pair_weight: how the ranking loss weighs a pair of tokens: "uniform" (spec Eq. 5-8: every pair alike) or
      "target_gap" (by |t_i - t_j|: pairs the saliency clearly orders, such as a needle against text, outweigh
      near-ties among text tokens, whose order is noise).
  """

  layers: tuple[int, ...]
  keep_ratio: float = PAPER_KEEP
  sink_tokens: int = 4
  recent_fraction: float = 0.1
  hidden: int | None = None
  saliency_reduce: str = "abs_sum"
  gumbel_tau: float = 1.0
  rank_pair_weight: str = "uniform"

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))
    if (not self.layers or any(not isinstance(l, int) or l < 1 for l in self.layers)
        or list(self.layers) != sorted(set(self.layers))):
      raise ValueError(f"SDTPConfig.layers must be strictly increasing ints >= 1, got {self.layers!r}")
    if not 0.0 < self.keep_ratio <= 1.0:
      raise ValueError(f"SDTPConfig.keep_ratio must lie in (0, 1], got {self.keep_ratio!r}")
    if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
      raise ValueError(f"SDTPConfig.sink_tokens must be an int >= 0, got {self.sink_tokens!r}")
    if not 0.0 <= self.recent_fraction <= 1.0:
      raise ValueError(f"SDTPConfig.recent_fraction must lie in [0, 1], got {self.recent_fraction!r}")
    if self.hidden is not None:
      positive_ints(self, "hidden")
    if self.saliency_reduce not in ("abs_sum", "signed_sum", "l2"):
      raise ValueError(f"SDTPConfig.saliency_reduce must be abs_sum, signed_sum or l2, got {self.saliency_reduce!r}")
    if self.rank_pair_weight not in RANK_PAIR_WEIGHTS:
      raise ValueError(f"SDTPConfig.rank_pair_weight must be one of {RANK_PAIR_WEIGHTS}, got "
                       f"{self.rank_pair_weight!r}")
    if not self.gumbel_tau > 0:
      raise ValueError(f"SDTPConfig.gumbel_tau must be > 0, got {self.gumbel_tau!r}")

  @classmethod
  def scaled_to_depth(cls, n_layers: int, n_stages: int = PAPER_STAGES, **fields) -> "SDTPConfig":
    """The paper's schedule (layer 4, step 3 on 32 layers) scaled to an n_layers model: first layer
    round(4 L / 32) (at least 1), step round(3 L / 32) shrunk until n_stages fit (at least 1). 12 layers give
    layers 2..11 (the spec's small-scale choice); a depth too shallow for n_stages is an error."""
    first = max(1, round(PAPER_FIRST_LAYER * n_layers / PAPER_DEPTH))
    step = round(PAPER_LAYER_STEP * n_layers / PAPER_DEPTH)
    if n_stages > 1:
      step = min(step, (n_layers - 1 - first) // (n_stages - 1))
    step = max(1, step)
    config = cls(layers=tuple(first + s * step for s in range(n_stages)), **fields)
    config.check_depth(n_layers)
    return config

  @property
  def n_stages(self) -> int:
    return len(self.layers)

  def check_depth(self, n_layers: int) -> None:
    """Every pruning layer must be a layer of the model after the first."""
    if self.layers[-1] >= n_layers:
      raise ValueError(f"SDTP schedule layers={self.layers} is impossible for a {n_layers}-layer model: pruning "
                       f"layers must lie in [1, {n_layers - 1}]")

  def recent_tokens(self, prompt_length: int) -> int:
    return max(1, math.ceil(self.recent_fraction * prompt_length))

  def forced_tokens(self, prompt_length: int) -> int:
    """Prompt tokens every stage keeps: the sinks and the recent window (overlapping in a short prompt)."""
    return min(prompt_length, self.sink_tokens + self.recent_tokens(prompt_length))

  def keep_counts(self, prompt_length: int) -> tuple[int, ...]:
    """Prompt tokens alive after each stage, round(r^(s+1) N); an error when a stage would have to drop a
    forced token."""
    counts = tuple(round(self.keep_ratio ** (s + 1) * prompt_length) for s in range(self.n_stages))
    forced = self.forced_tokens(prompt_length)
    if counts[-1] < forced:
      raise ValueError(
          f"SDTP schedule keep_ratio={self.keep_ratio} over {self.n_stages} stages is impossible for a "
          f"{prompt_length}-token prompt: the last stage keeps {counts[-1]} tokens but {forced} are always kept "
          f"({self.sink_tokens} sinks + {self.recent_tokens(prompt_length)} recent)")
    return counts

  def check(self, n_layers: int, prompt_length: int) -> tuple[int, ...]:
    """Checks the schedule against a model depth and prompt length; returns the keep counts."""
    self.check_depth(n_layers)
    return self.keep_counts(prompt_length)


def forced_mask(config: SDTPConfig, positions: jax.Array, prompt_length: int) -> jax.Array:
  """bool [B, S]: live tokens that every stage keeps: sinks, the recent window of each row's prompt (rows of a
  left-padded batch end at different positions) and every token after the prompt."""
  chex.assert_rank(positions, 2)
  prompt = (positions >= 0) & (positions < prompt_length)
  prompt_end = jnp.max(jnp.where(prompt, positions, -1), axis=1, keepdims=True)
  sink = prompt & (positions < config.sink_tokens)
  recent = prompt & (positions > prompt_end - config.recent_tokens(prompt_length))
  return sink | recent | (positions >= prompt_length)


def select_tokens(config: SDTPConfig, scores: jax.Array, positions: jax.Array, prompt_length: int,
                  n_keep: int) -> jax.Array:
  """int32 [B, n_keep]: the indices (into S) of the tokens a stage keeps, in their original order.

  Forced tokens first, then live tokens by descending score, then dead ones (padding, dropped) to fill a
  static count. n_keep counts every kept token, forced ones included.
  """
  chex.assert_equal_shape([scores, positions])
  if not 0 < n_keep <= scores.shape[1]:
    raise ValueError(f"select_tokens: n_keep={n_keep} must lie in [1, {scores.shape[1]}]")
  priority = jnp.where(forced_mask(config, positions, prompt_length), jnp.inf,
                       jnp.where(positions >= 0, scores.astype(jnp.float32), -jnp.inf))
  _, keep = jax.lax.top_k(priority, n_keep)
  return jnp.sort(keep, axis=1).astype(jnp.int32)
