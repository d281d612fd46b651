"""Layer-stack hooks: run the decoder's layers in stages with a function between stages.

Token pruning (SDTP) drops tokens after some layers; other papers may reorder or merge them. A hook sees the
tokens as a `TokenState`, hidden states with the RoPE position and the input index of each token, and
returns the tokens the next stage runs on. Positions travel with their tokens, so RoPE and causality stay
those of the original sequence, and the KV cache of every later layer holds only the kept tokens.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TokenState:
  """The tokens entering a stage.

  Attributes:
    x: [B, S, D] hidden states.
    positions: int32 [B, S] RoPE position of each token (its position in the original sequence).
    indices: int32 [B, S] index of each token in the input tokens of this call.
  """

  x: jax.Array
  positions: jax.Array
  indices: jax.Array

  def select(self, keep: jax.Array) -> "TokenState":
    """The tokens at keep [B, S'] (indices into this state's S axis), in that order."""
    chex.assert_rank(keep, 2)
    chex.assert_equal_shape_prefix([keep, self.positions], 1)
    take = lambda a: jnp.take_along_axis(a, keep.reshape(*keep.shape, *(1,) * (a.ndim - 2)), axis=1)
    return TokenState(x=take(self.x), positions=take(self.positions), indices=take(self.indices))


StageHook = Callable[[int, TokenState, Any], TokenState]


@dataclasses.dataclass(frozen=True)
class LayerStages:
  """Splits the stack at `boundaries` and calls `between(stage, tokens, hook_params)` after every stage but the
  last, where stage = 0, 1, ... numbers the stage just run and hook_params is the pytree given to the forward
  (e.g. the predictors of SDTP), traced, so new values do not recompile.

  Attributes:
    boundaries: strictly increasing layer indices in (0, L) where a new stage starts; stage i runs layers
      [boundaries[i - 1], boundaries[i]).
    between: the hook; it returns a `TokenState` (usually `tokens.select(keep)`) with any number of tokens.
  """

  boundaries: tuple[int, ...]
  between: StageHook

  def __post_init__(self):
    object.__setattr__(self, "boundaries", tuple(self.boundaries))
    if any(not isinstance(b, int) for b in self.boundaries) or list(self.boundaries) != sorted(set(self.boundaries)):
      raise ValueError(f"LayerStages.boundaries must be strictly increasing ints, got {self.boundaries!r}")

  def ranges(self, n_layers: int) -> list[tuple[int, int]]:
    """[(first, end)] layer ranges of the stages of an n_layers stack."""
    if self.boundaries and not 0 < self.boundaries[0] <= self.boundaries[-1] < n_layers:
      raise ValueError(f"LayerStages.boundaries={self.boundaries} must lie in (0, {n_layers}) for {n_layers} layers")
    edges = (0, *self.boundaries, n_layers)
    return list(zip(edges[:-1], edges[1:]))
