"""Model merging as pure functions over param pytrees: mergekit's linear, task arithmetic, TIES and DARE.

Pangu Embedded merges between distillation iterations to "aggregate complementary knowledge" [C]; the formula is
unconfirmed [U], so this module offers the mergekit methods (spec 3c), with task vectors tau_i = theta_i - base:
  - `linear`:           sum_i w_i theta_i / sum_i w_i
  - `task_arithmetic`:  base + lambda * sum_i w_i tau_i
  - `ties`:             trim each tau_i to its top-`density` entries by magnitude (per tensor), elect the sign
                        gamma = sign(sum_i w_i trimmed_i), average (weighted) only the entries agreeing with gamma,
                        add lambda times that to the base
  - `dare`:             tau_i * Bernoulli(density) / density (unbiased), then linear (task arithmetic) or TIES
                        without the trim
  - `accumulate` (the default between iterations): (1 - alpha) merged_{t-1} + alpha theta_t, alpha = 0.5, i.e.
                        task-vector accumulation merged_{t-1} + alpha (theta_t - merged_{t-1}).
Arithmetic runs in float32 and each leaf keeps its dtype. DARE re-dropping an already sparse delta compounds
sparsity and variance (mergekit #258): apply it to fresh task vectors, never to a merged result.
"""

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Params = Any
METHODS = ("none", "accumulate", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")


@dataclasses.dataclass(frozen=True)
class MergeConfig:
  """How iteration t's model joins the merged model (`merge_iteration`).

  Attributes:
    method: one of METHODS; "none" keeps the new model (last iteration only).
    alpha: `accumulate`'s weight of the new model.
    density: kept fraction for TIES's trim and DARE's drop.
    scale: lambda of task arithmetic / TIES / DARE.
  """

  method: str = "accumulate"
  alpha: float = 0.5
  density: float = 0.5
  scale: float = 1.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"MergeConfig.method must be one of {METHODS}, got {self.method!r}")
    if not 0 <= self.alpha <= 1:
      raise ValueError(f"MergeConfig.alpha must be in [0, 1], got {self.alpha!r}")
    if not 0 < self.density <= 1:
      raise ValueError(f"MergeConfig.density must be in (0, 1], got {self.density!r}")


def _weights(n: int, weights: Sequence[float] | None) -> jax.Array:
  if n == 0:
    raise ValueError("need at least one model to merge")
  weights = jnp.ones(n) if weights is None else jnp.asarray(weights, jnp.float32)
  if weights.shape != (n,):
    raise ValueError(f"got {weights.shape[0] if weights.ndim else 'scalar'} weights for {n} models")
  return weights


def _check_structure(trees: Sequence[Params]) -> None:
  first = jax.tree.structure(trees[0])
  for i, tree in enumerate(trees[1:], 1):
    if jax.tree.structure(tree) != first:
      raise ValueError(f"model {i} has a different param tree structure from model 0")


def _map(fn, base: Params | None, models: Sequence[Params]) -> Params:
  """fn(base_leaf float32 or None, [model leaves float32]) per leaf, cast back to the model's dtype."""
  _check_structure(list(models) + ([] if base is None else [base]))
  def leaf(*leaves):
    dtype = leaves[-1].dtype
    arrays = [x.astype(jnp.float32) for x in leaves]
    out = fn(None, arrays) if base is None else fn(arrays[0], arrays[1:])
    return out.astype(dtype)
  return jax.tree.map(leaf, *([] if base is None else [base]), *models)


# Each merge is one jitted program: eager, every small op of every leaf would dispatch (and compile) on its own.
@jax.jit
def _linear(models, w):
  return _map(lambda _, xs: sum(wi * x for wi, x in zip(w, xs)) / jnp.sum(w), None, models)


def linear(models: Sequence[Params], weights: Sequence[float] | None = None) -> Params:
  """sum_i w_i theta_i / sum_i w_i."""
  return _linear(list(models), _weights(len(models), weights))


@jax.jit
def _task_arithmetic(base, models, w, scale):
  return _map(lambda b, xs: b + scale * sum(wi * (x - b) for wi, x in zip(w, xs)), base, models)


def task_arithmetic(base: Params, models: Sequence[Params], weights: Sequence[float] | None = None,
                    scale: float = 1.0) -> Params:
  """base + scale * sum_i w_i (theta_i - base)."""
  return _task_arithmetic(base, list(models), _weights(len(models), weights), scale)


def trim(delta: jax.Array, density: float) -> jax.Array:
  """Keeps the top ceil(density * size) entries of `delta` by magnitude (mergekit's `magnitude` sparsify: ties at
  the threshold are broken by position via a stable sort), zeroes the rest."""
  flat = delta.reshape(-1)
  keep = math.ceil(density * flat.size)
  order = jnp.argsort(-jnp.abs(flat), stable=True)
  mask = jnp.zeros(flat.shape, bool).at[order[:keep]].set(True)
  return jnp.where(mask, flat, 0).reshape(delta.shape)


def _disjoint_mean(deltas: list[jax.Array], w: jax.Array) -> jax.Array:
  """TIES's sign election and disjoint weighted mean over stacked deltas."""
  stacked = jnp.stack([wi * d for wi, d in zip(w, deltas)])
  gamma = jnp.sign(jnp.sum(stacked, axis=0))
  agree = (jnp.sign(stacked) == gamma) & (stacked != 0)
  weight = jnp.where(agree, w.reshape(-1, *([1] * gamma.ndim)), 0)
  total = jnp.sum(weight, axis=0)
  return jnp.where(total > 0, jnp.sum(jnp.where(agree, stacked, 0), axis=0) / jnp.where(total > 0, total, 1), 0)


@functools.partial(jax.jit, static_argnames="density")
def _ties(base, models, w, scale, density):
  return _map(lambda b, xs: b + scale * _disjoint_mean([trim(x - b, density) for x in xs], w), base, models)


def ties(base: Params, models: Sequence[Params], weights: Sequence[float] | None = None, density: float = 0.5,
         scale: float = 1.0) -> Params:
  """TIES-merging (Yadav et al. 2023) as mergekit computes it: trim, elect sign, disjoint (weighted) mean."""
  return _ties(base, list(models), _weights(len(models), weights), scale, density=density)


def dare_drop(delta: Params, density: float, rng: jax.Array) -> Params:
  """tau * m / density with m ~ Bernoulli(density) per entry: unbiased, E[result] = tau."""
  leaves, treedef = jax.tree.flatten(delta)
  keys = jax.random.split(rng, len(leaves))
  dropped = [jnp.where(jax.random.bernoulli(k, density, x.shape), x.astype(jnp.float32) / density, 0).astype(x.dtype)
             for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, dropped)


@functools.partial(jax.jit, static_argnames=("density", "sign_consensus"))
def _dare(base, models, rng, w, scale, density, sign_consensus):
  keys = jax.random.split(rng, len(models))
  deltas = [dare_drop(jax.tree.map(jnp.subtract, m, base), density, k) for m, k in zip(models, keys)]
  if sign_consensus:
    return _map(lambda b, ds: b + scale * _disjoint_mean(ds, w), base, deltas)
  return _map(lambda b, ds: b + scale * sum(wi * d for wi, d in zip(w, ds)), base, deltas)


def dare(base: Params, models: Sequence[Params], rng: jax.Array, weights: Sequence[float] | None = None,
         density: float = 0.5, scale: float = 1.0, sign_consensus: bool = False) -> Params:
  """DARE (Yu et al. 2024): drop-and-rescale each task vector with its own key, then task arithmetic
  (`dare_linear`) or TIES's sign election and disjoint mean (`dare_ties`, sign_consensus=True)."""
  return _dare(base, list(models), rng, _weights(len(models), weights), scale, density=density,
               sign_consensus=sign_consensus)


@jax.jit
def accumulate(merged: Params, new: Params, alpha: float = 0.5) -> Params:
  """(1 - alpha) merged + alpha new: the default inter-iteration merge (spec 3c)."""
  return _map(lambda m, xs: (1 - alpha) * m + alpha * xs[0], merged, [new])


def merge_iteration(config: MergeConfig, merged: Params, new: Params, *, base: Params | None = None,
                    history: Sequence[Params] = (), rng: jax.Array | None = None) -> Params:
  """The merged model after an iteration. `merged` is the previous merged model, `new` the model fine-tuned
  from it. `accumulate` uses only these two; the fixed-base ablations (task_arithmetic, ties, dare_*) merge
  `history` + [new] (every iteration's model) onto `base` (theta_0) with equal weights; `linear` averages them."""
  if config.method == "none":
    return new
  if config.method == "accumulate":
    return accumulate(merged, new, config.alpha)
  models = list(history) + [new]
  if config.method == "linear":
    return linear(models)
  if base is None:
    raise ValueError(f"merge method {config.method!r} needs the base model")
  if config.method == "task_arithmetic":
    return task_arithmetic(base, models, scale=config.scale / len(models))
  if config.method == "ties":
    return ties(base, models, density=config.density, scale=config.scale)
  if rng is None:
    raise ValueError(f"merge method {config.method!r} needs an explicit PRNG key")
  return dare(base, models, rng, density=config.density, scale=config.scale / (1 if config.method == "dare_ties"
              else len(models)), sign_consensus=config.method == "dare_ties")


def delta_stats(new: Params, reference: Params) -> dict[str, float]:
  """Norm and zero fraction of new - reference (the spec's per-iteration DARE log)."""
  deltas = jax.tree.leaves(jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), new, reference))
  size = sum(d.size for d in deltas)
  return {"delta_norm": float(jnp.sqrt(sum(jnp.sum(d * d) for d in deltas))),
          "zero_fraction": float(sum(jnp.sum(d == 0) for d in deltas) / size)}
