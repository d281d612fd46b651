"""Plain-XLA MoGE routing with the dispatch permutation: the oracle every backend kernel is tested against.

Pangu Pro MoE (arXiv 2505.21411), Eq. 5-7. T tokens, N experts, M groups of G = N / M contiguous ids, K' experts
per group, K = M K' per token.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class MoGERouting(NamedTuple):
  """What the router hands the dispatch.

  Attributes:
    weights: [T, K] float32, the global softmax probability of each chosen expert (not renormalised).
    expert_ids: [T, K] int32, group-major: columns [g K', (g + 1) K') are group g's experts, best first.
    sort_order: [T K] int32, the assignments t * K + k sorted by expert, tokens in order inside an expert
      (a stable sort): row r of the expert-sorted buffer is token sort_order[r] // K.
    group_sizes: [N] int32, assignments per expert (the `group_sizes` of `jax.lax.ragged_dot`).
  """

  weights: jax.Array
  expert_ids: jax.Array
  sort_order: jax.Array
  group_sizes: jax.Array

  @property
  def group_offsets(self) -> jax.Array:
    """[N + 1] int32: expert e's rows are sort_order[group_offsets[e]:group_offsets[e + 1]]."""
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(self.group_sizes, dtype=jnp.int32)])


def check_shapes(logits: jax.Array, num_groups: int, k_per_group: int) -> None:
  if logits.ndim != 2:
    raise ValueError(f"logits must be [T, N], got shape {logits.shape}")
  n = logits.shape[1]
  if num_groups < 1 or n % num_groups:
    raise ValueError(f"num_groups={num_groups} must divide the {n} experts")
  if not 1 <= k_per_group <= n // num_groups:
    raise ValueError(f"k_per_group={k_per_group} must be in [1, group size {n // num_groups}]")


@functools.partial(jax.jit, static_argnames=("num_groups", "k_per_group"))
def moge_routing(logits: jax.Array, *, num_groups: int, k_per_group: int) -> MoGERouting:
  """logits [T, N] -> MoGERouting: softmax over N in float32, top-K' per group (ties: lowest id), stable sort."""
  check_shapes(logits, num_groups, k_per_group)
  t, n = logits.shape
  group_size = n // num_groups
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, local = jax.lax.top_k(probs.reshape(t, num_groups, group_size), k_per_group)
  expert_ids = (local + (jnp.arange(num_groups) * group_size)[None, :, None]).reshape(t, -1).astype(jnp.int32)
  flat = expert_ids.reshape(-1)
  return MoGERouting(weights=weights.reshape(t, -1), expert_ids=expert_ids,
                     sort_order=jnp.argsort(flat, stable=True).astype(jnp.int32),
                     group_sizes=jnp.zeros((n,), jnp.int32).at[flat].add(1))
