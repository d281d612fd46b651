"""Loss-spike detector: an EMA of each signal's mean and variance, updated inside the jitted train step.

Step t is a spike for threshold k when x_t > mu_{t-1} + k * sigma_{t-1} (Pangu Ultra judges spikes by eye; the
rule is ours, fixed before any run). Flagged steps are not fed into the EMA, so a long spike does not raise its
own baseline, and consecutive flagged steps form one event. Non-finite values are always spikes. Several
thresholds are tracked side by side, each with its own EMA (they see different unflagged steps).
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SpikeConfig:
  """decay: EMA decay; thresholds: the k values; warmup_steps: steps fed to the EMA but never flagged."""

  decay: float = 0.9
  thresholds: tuple[float, ...] = (3.0, 6.0)
  warmup_steps: int = 20

  def __post_init__(self):
    if not 0.0 < self.decay < 1.0:
      raise ValueError(f"SpikeConfig.decay must be in (0, 1), got {self.decay!r}")
    if not self.thresholds or any(k <= 0 for k in self.thresholds):
      raise ValueError(f"SpikeConfig.thresholds must be positive, got {self.thresholds!r}")
    if self.warmup_steps < 1:
      raise ValueError(f"SpikeConfig.warmup_steps must be >= 1, got {self.warmup_steps!r}")


@flax.struct.dataclass
class SpikeState:
  """Arrays of shape [signals, thresholds]; `seen` counts the steps observed."""

  mean: jax.Array
  var: jax.Array
  flagged: jax.Array
  events: jax.Array
  seen: jax.Array


def init_spike_state(config: SpikeConfig, num_signals: int) -> SpikeState:
  shape = (num_signals, len(config.thresholds))
  return SpikeState(mean=jnp.zeros(shape), var=jnp.zeros(shape), flagged=jnp.zeros(shape, bool),
                    events=jnp.zeros(shape, jnp.int32), seen=jnp.zeros((), jnp.int32))


def update_spike_state(config: SpikeConfig, state: SpikeState, signals: jax.Array) -> SpikeState:
  """Feeds one value per signal ([signals]); returns the new state, whose `flagged` marks this step."""
  x = jnp.broadcast_to(signals.astype(jnp.float32)[:, None], state.mean.shape)
  k = jnp.asarray(config.thresholds, jnp.float32)[None, :]
  finite = jnp.isfinite(x)
  past_warmup = state.seen >= config.warmup_steps
  flagged = ~finite | (past_warmup & (x > state.mean + k * jnp.sqrt(state.var)))
  first = state.seen == 0
  delta = jnp.where(finite, x - state.mean, 0.0)
  alpha = 1.0 - config.decay
  new_mean = jnp.where(first, jnp.where(finite, x, 0.0), state.mean + alpha * delta)
  new_var = jnp.where(first, 0.0, config.decay * (state.var + alpha * jnp.square(delta)))
  keep = flagged
  return SpikeState(
      mean=jnp.where(keep, state.mean, new_mean),
      var=jnp.where(keep, state.var, new_var),
      flagged=flagged,
      events=state.events + (flagged & ~state.flagged).astype(jnp.int32),
      seen=state.seen + 1)
