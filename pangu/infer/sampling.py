"""Next-token choice: greedy, or sampling with temperature, top-k and top-p (nucleus) filtering.

Filters apply in the order Hugging Face's generate uses: temperature, then top-k, then top-p, so the same
settings give the same distribution in both.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick the next token from logits.

  Attributes:
    temperature: divides the logits; 0 means greedy (argmax), and the other fields are then unused.
    top_k: keep only the k most likely tokens (0: no limit).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1: no limit).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be an int >= 0, got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@functools.partial(jax.jit, static_argnums=1)
def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """logits [B, V] -> tempered logits [B, V] with -inf outside the top-k / top-p set.

  Tokens tied with the last kept one are kept too, so the set can exceed k by ties.
  """
  chex.assert_rank(logits, 2)
  x = logits.astype(jnp.float32) / config.temperature
  if config.top_k == 0 and config.top_p == 1:
    return x
  vocab = x.shape[-1]
  # Candidates in descending order: only the top k when k is set, so top-p never sorts the whole vocabulary.
  candidates = jax.lax.top_k(x, min(config.top_k or vocab, vocab))[0]
  kept = candidates.shape[-1]
  if config.top_p < 1:
    probs = jax.nn.softmax(candidates, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < config.top_p, axis=-1, keepdims=True)  # >= 1: the first has mass_before 0
  threshold = jnp.take_along_axis(candidates, jnp.broadcast_to(kept - 1, (x.shape[0], 1)), axis=-1)
  return jnp.where(x < threshold, -jnp.inf, x)


@functools.partial(jax.jit, static_argnums=2)
def sample(logits: jax.Array, rng: jax.Array, config: SamplingConfig) -> jax.Array:
  """logits [B, V] -> int32 token ids [B]."""
  if config.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits, config), axis=-1).astype(jnp.int32)
