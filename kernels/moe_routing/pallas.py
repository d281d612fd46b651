"""Fused MoGE routing kernel: logits -> global softmax -> group-wise top-K' -> weights, ids, dispatch ranks.

One program per block of `block_tokens` tokens (a static grid; T is padded up to whole blocks and the padded
rows are masked out of every count). Per block, with U [bt, N] the 0/1 matrix "token t uses expert e":

1. S = softmax(logits) over all N experts, in float32.
2. For each group g and each of its K' picks: the largest remaining S in the group, ties to the lowest id
   (a masked max, then a masked min over column ids); record weight, id, and mark U.
3. rank[t, k] = sum_{t' < t} U[t', e_{t,k}]: the position of assignment (t, k) among the block's assignments
   to the same expert, from one strictly-lower-triangular [bt, bt] x [bt, N] matmul.
4. counts[b] = sum_t U[t, :], the block's assignments per expert.

The epilogue (plain XLA, O(T K + blocks N)) turns counts into expert offsets and per-block offsets, so that
position(t, k) = offset[e] + block_offset[b, e] + rank[t, k] and sort_order[position] = t K + k: the same stable
counting sort as `reference.moge_routing`. Everything in the body is 2-D elementwise work, reductions over the
last axis and one matmul, so it lowers with interpret=True on CPU and compiles on GPU; Triton needs power-of-two
N, K and block_tokens (>= 16 for the matmul), which `api.py` checks.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pangu_kernels.moe_routing.reference import MoGERouting, check_shapes

DEFAULT_BLOCK_TOKENS = 64


def _routing_kernel(logits_ref, weights_ref, ids_ref, rank_ref, counts_ref, *, num_tokens: int, num_groups: int,
                    k_per_group: int):
  logits = logits_ref[...].astype(jnp.float32)
  block, n = logits.shape
  k = num_groups * k_per_group
  group_size = n // num_groups
  row = pl.program_id(0) * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
  column = jax.lax.broadcasted_iota(jnp.int32, (block, n), 1)
  pick_column = jax.lax.broadcasted_iota(jnp.int32, (block, k), 1)

  shifted = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
  probs = shifted / jnp.sum(shifted, axis=1, keepdims=True)

  remaining = probs
  uses = jnp.zeros((block, n), jnp.float32)
  weights = jnp.zeros((block, k), jnp.float32)
  ids = jnp.zeros((block, k), jnp.int32)
  picks = []
  for g in range(num_groups):
    in_group = (column >= g * group_size) & (column < (g + 1) * group_size)
    for j in range(k_per_group):
      candidates = jnp.where(in_group, remaining, -1.0)
      best = jnp.max(candidates, axis=1, keepdims=True)
      expert = jnp.min(jnp.where(candidates == best, column, n), axis=1, keepdims=True)
      hit = column == expert
      remaining = jnp.where(hit, -1.0, remaining)
      uses = jnp.where(hit, 1.0, uses)
      weights = jnp.where(pick_column == g * k_per_group + j, best, weights)
      ids = jnp.where(pick_column == g * k_per_group + j, expert, ids)
      picks.append(expert)
  uses = jnp.where(row < num_tokens, uses, 0.0)

  earlier = (jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
             < jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)).astype(jnp.float32)
  before = jnp.dot(earlier, uses, preferred_element_type=jnp.float32)
  rank = jnp.zeros((block, k), jnp.int32)
  for c, expert in enumerate(picks):
    rank_c = jnp.sum(jnp.where(column == expert, before, 0.0), axis=1, keepdims=True).astype(jnp.int32)
    rank = jnp.where(pick_column == c, rank_c, rank)

  weights_ref[...] = weights
  ids_ref[...] = ids
  rank_ref[...] = rank
  counts_ref[...] = jnp.sum(uses, axis=0, keepdims=True).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_groups", "k_per_group", "block_tokens", "interpret"))
def moge_routing(logits: jax.Array, *, num_groups: int, k_per_group: int,
                 block_tokens: int = DEFAULT_BLOCK_TOKENS, interpret: bool = False) -> MoGERouting:
  """logits [T, N] -> MoGERouting, with the routing of every block of tokens in one fused kernel."""
  check_shapes(logits, num_groups, k_per_group)
  t, n = logits.shape
  k = num_groups * k_per_group
  num_blocks = pl.cdiv(t, block_tokens)
  padded = jnp.pad(logits, ((0, num_blocks * block_tokens - t), (0, 0)))
  kernel = functools.partial(_routing_kernel, num_tokens=t, num_groups=num_groups, k_per_group=k_per_group)
  picks = pl.BlockSpec((block_tokens, k), lambda b: (b, 0))
  weights, ids, rank, counts = pl.pallas_call(
      kernel,
      grid=(num_blocks,),
      in_specs=[pl.BlockSpec((block_tokens, n), lambda b: (b, 0))],
      out_specs=[picks, picks, picks, pl.BlockSpec((pl.squeezed, 1, n), lambda b: (b, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((num_blocks * block_tokens, k), jnp.float32),
                 jax.ShapeDtypeStruct((num_blocks * block_tokens, k), jnp.int32),
                 jax.ShapeDtypeStruct((num_blocks * block_tokens, k), jnp.int32),
                 jax.ShapeDtypeStruct((num_blocks, 1, n), jnp.int32)],
      interpret=interpret,
      name="moge_routing",
  )(padded)
  weights, ids, rank, counts = weights[:t], ids[:t], rank[:t], counts[:, 0]

  group_sizes = counts.sum(axis=0)
  expert_offsets = jnp.cumsum(group_sizes) - group_sizes
  block_offsets = jnp.cumsum(counts, axis=0) - counts
  block = (jnp.arange(t) // block_tokens)[:, None]
  position = expert_offsets[ids] + block_offsets[block, ids] + rank
  sort_order = jnp.zeros((t * k,), jnp.int32).at[position.reshape(-1)].set(jnp.arange(t * k, dtype=jnp.int32))
  return MoGERouting(weights=weights, expert_ids=ids, sort_order=sort_order, group_sizes=group_sizes)
