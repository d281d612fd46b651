"""Where each token -> expert assignment goes: the sort of the dropless path and the slots of the capacity path.

An assignment is one (token, choice) pair; with W choices per row, assignment a = row * W + choice. These
functions only move indices; `experts.py` moves the activations with them.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertSort(NamedTuple):
  """Assignments sorted by expert, the input layout of a grouped matmul.

  Attributes:
    order: [R * W] int32, assignment indices sorted by expert id; stable, so rows keep their order inside an
      expert, and invalid assignments come last.
    group_sizes: [E] int32, valid assignments per expert (the `group_sizes` of `jax.lax.ragged_dot`).
  """

  order: jax.Array
  group_sizes: jax.Array


def _bincount(ids: jax.Array, length: int) -> jax.Array:
  return jnp.zeros((length,), jnp.int32).at[ids].add(1, mode="drop")


def sort_by_expert(expert_ids: jax.Array, *, num_experts: int, valid: jax.Array | None = None) -> ExpertSort:
  """Sorts assignments expert_ids [R, W] by expert; `valid` [R, W] (optional) sends the others to the end."""
  flat = expert_ids.reshape(-1)
  if valid is not None:
    flat = jnp.where(valid.reshape(-1), flat, num_experts)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  return ExpertSort(order, _bincount(flat, num_experts))


def bucket_capacity(num_assignments: int, num_buckets: int, capacity_factor: float) -> int:
  """Slots per bucket: ceil(capacity_factor * assignments / buckets), at least 1."""
  return max(1, math.ceil(capacity_factor * num_assignments / num_buckets))


def capacity_slots(bucket_ids: jax.Array, *, num_buckets: int, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Slot of each assignment inside its bucket, first come first served.

  bucket_ids [A] lists the assignments in priority order; an id outside [0, num_buckets) marks an assignment
  that needs no slot here (it is neither kept nor dropped). Returns (slot [A] int32, keep [A] bool), where
  keep = the assignment has a bucket and slot < capacity. Dropped assignments are `in_range & ~keep`.
  """
  in_range = (bucket_ids >= 0) & (bucket_ids < num_buckets)
  buckets = jnp.where(in_range, bucket_ids, num_buckets)
  order = jnp.argsort(buckets, stable=True)
  counts = _bincount(buckets, num_buckets + 1)
  starts = jnp.cumsum(counts) - counts
  rank_in_sorted = jnp.arange(buckets.shape[0], dtype=jnp.int32) - starts[buckets[order]]
  slot = jnp.zeros_like(rank_in_sorted).at[order].set(rank_in_sorted)
  return slot, in_range & (slot < capacity)
