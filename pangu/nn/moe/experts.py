"""Routed SwiGLU experts: y_t = sum_k w_{t,k} E_{e_{t,k}}(x_t), with E_e(x) = down_e(silu(x gate_e) * x up_e).

T tokens (rows), W choices per row, E experts, D model width, F expert width. One interface,
`routed_experts(x, weights, expert_ids, experts)`, with four implementations:

- `dense`: every expert on every token, then a weighted sum. Readable, O(T E D F); the test oracle.
- `ragged`: sort assignments by expert (`dispatch.sort_by_expert`) and run `jax.lax.ragged_dot`, a grouped
  matmul that touches each assignment once on GPU/TPU. XLA's CPU backend lowers it to a masked product over
  all E groups, which costs as much as `dense` times W.
- `blocked`: the same sort, with each expert's rows padded to whole blocks (MegaBlocks' layout) and a scan of
  dense [block, D] x [D, F] matmuls, one expert per block. Touches each assignment once plus at most one block
  of padding per expert; the fast choice on CPU.
- `selected`: a loop over the distinct experts the rows chose, each applied to exactly the rows routed to it
  (one matrix-vector product per assignment). O(T W D F), and it reads only the chosen experts' kernels, once
  each: the fast choice for a handful of rows, as in decoding, where `blocked` pays a block per expert. Inference only: the loop's trip count is dynamic, which reverse-mode differentiation does not
  support. `pangu.nn.moe.offload` runs the same loop on kernels copied in from host memory.

`capacity_experts` is the capacity-factor variant: fixed [E, C] slots per expert and exact dropped counts.
Every product with an expert kernel goes through `pangu.nn.linear` (`swiglu` and `weight_ragged_dot`).
"""

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from pangu.nn import linear
from pangu.nn.moe import dispatch
from pangu.parallel import rules

MAX_BLOCK_ROWS = 128
MIN_BLOCK_ROWS = 8


class ExpertWeights(NamedTuple):
  """Stacked expert kernels: gate, up [E, D, F] and down [E, F, D]."""

  gate: jax.Array
  up: jax.Array
  down: jax.Array

  @property
  def num_experts(self) -> int:
    return self.gate.shape[0]


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """One expert: x [..., D], gate/up [D, F], down [F, D] -> [..., D]."""
  hidden = (jax.nn.silu(linear.weight_einsum("...d,df->...f", x, gate))
            * linear.weight_einsum("...d,df->...f", x, up))
  return linear.weight_einsum("...f,fd->...d", hidden, down)


def batched_swiglu(x: jax.Array, experts: ExpertWeights) -> jax.Array:
  """Expert e on its own rows: x [E, C, D] -> [E, C, D]."""
  return jax.vmap(swiglu)(x, experts.gate, experts.up, experts.down)


def resolve_implementation(implementation: str) -> str:
  """`auto` -> `ragged` where ragged_dot is a real grouped matmul (GPU, TPU), `blocked` elsewhere."""
  if implementation != "auto":
    return implementation
  return "ragged" if jax.default_backend() in ("gpu", "tpu") else "blocked"


def selected_experts(expert_ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """expert_ids [T, W] -> (ids [E] with the chosen experts first, in increasing order; how many were chosen)."""
  chosen = jnp.zeros((num_experts,), bool).at[expert_ids.reshape(-1)].set(True)
  return jnp.argsort(~chosen, stable=True), chosen.sum()


def loop_over_selected(x: jax.Array, weights: jax.Array, expert_ids: jax.Array, num_experts: int,
                       load: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
  """sum over the chosen experts e of w * E_e(x_t) for exactly the rows t routed to e, with E_e's kernels from
  `load(e)`: a while loop over the chosen experts (so only they are loaded, once each) and, inside, over their
  assignments (one [D] x [D, F] product per (row, choice): the FLOPs of routing, no padding).
  x [T, D], weights / expert_ids [T, W]; weights of unchosen slots 0."""
  order, count = selected_experts(expert_ids, num_experts)
  # Assignments sorted by expert: expert e's rows are the slice [starts[e], starts[e + 1]).
  flat_ids = expert_ids.reshape(-1)
  by_expert = jnp.argsort(flat_ids, stable=True)
  rows = by_expert // expert_ids.shape[1]
  coefs = weights.reshape(-1)[by_expert].astype(x.dtype)
  starts = jnp.searchsorted(flat_ids[by_expert], jnp.arange(num_experts + 1), side="left")

  def apply_expert(carry):
    i, y = carry
    expert = order[i]
    kernels = load(expert)

    def apply_row(inner):
      j, y = inner
      return j + 1, y.at[rows[j]].add(coefs[j] * swiglu(x[rows[j]], *kernels))

    _, y = jax.lax.while_loop(lambda c: c[0] < starts[expert + 1], apply_row, (starts[expert], y))
    return i + 1, y

  return jax.lax.while_loop(lambda c: c[0] < count, apply_expert, (jnp.zeros((), jnp.int32), jnp.zeros_like(x)))[1]


def _block_rows(num_rows: int, num_experts: int) -> int:
  """A power of two near the mean group size: padding costs at most one block per expert."""
  mean = max(num_rows // num_experts, MIN_BLOCK_ROWS)
  return min(MAX_BLOCK_ROWS, 1 << (mean.bit_length() - 1))


def _blocked_swiglu(x: jax.Array, group_sizes: jax.Array, experts: ExpertWeights) -> jax.Array:
  """Grouped SwiGLU over rows sorted by expert, as a scan over fixed-size blocks of one expert each.

  1. Pad every group to a multiple of `block` rows; the number of blocks is at most ceil(R / block) + E.
  2. Gather each block's expert kernels ([blocks, D, F] each, so the backward pass writes one gradient per
     block instead of accumulating a dense [E, D, F] one at every step; sized for CPU-scale models).
  3. Scan over blocks; blocks past the last group are skipped (`lax.cond`), so a buffer with few valid rows
     (the ring exchange) costs only those rows.
  4. Gather the rows back; rows past sum(group_sizes) (invalid assignments) come back as zeros.
  """
  num_rows, d = x.shape
  num_experts = experts.num_experts
  block = _block_rows(num_rows, num_experts)
  num_blocks = -(-num_rows // block) + num_experts
  group_end = jnp.cumsum(group_sizes)
  padded = -(-group_sizes // block) * block
  padded_end = jnp.cumsum(padded)
  row_expert = jnp.searchsorted(group_end, jnp.arange(num_rows), side="right")
  safe_expert = jnp.minimum(row_expert, num_experts - 1)
  offset_in_group = jnp.arange(num_rows) - (group_end - group_sizes)[safe_expert]
  destination = jnp.where(row_expert < num_experts, padded_end[safe_expert] - padded[safe_expert] + offset_in_group,
                          num_blocks * block)
  blocks = jnp.zeros((num_blocks * block, d), x.dtype).at[destination].set(x, mode="drop")
  block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right"),
                             num_experts - 1)
  used_blocks = padded_end[-1] // block

  def body(_, inputs):
    rows, gate, up, down, index = inputs
    compute = lambda rows: swiglu(rows, gate, up, down)
    # Zeros of the computed branch's type: under shard_map the output varies over the rows' and the kernels'
    # mesh axes, and both branches must agree.
    skip = lambda rows: jnp.zeros_like(rows) * down[0]
    return None, jax.lax.cond(index < used_blocks, compute, skip, rows)

  kernels = (w[block_expert] for w in experts)
  _, out = jax.lax.scan(body, None, (blocks.reshape(num_blocks, block, d), *kernels, jnp.arange(num_blocks)))
  return out.reshape(num_blocks * block, d).at[destination].get(mode="fill", fill_value=0)


def grouped_swiglu(x: jax.Array, group_sizes: jax.Array, experts: ExpertWeights, *,
                   implementation: str) -> jax.Array:
  """Rows x [R, D] sorted by expert, group_sizes [E] -> [R, D]; rows past sum(group_sizes) give zeros."""
  if implementation == "blocked":
    return _blocked_swiglu(x, group_sizes, experts)
  if implementation != "ragged":
    raise ValueError(f"grouped_swiglu: implementation must be 'ragged' or 'blocked', got {implementation!r}")
  hidden = (jax.nn.silu(linear.weight_ragged_dot(x, experts.gate, group_sizes))
            * linear.weight_ragged_dot(x, experts.up, group_sizes))
  return linear.weight_ragged_dot(hidden, experts.down, group_sizes)


def routed_experts(x: jax.Array, weights: jax.Array, expert_ids: jax.Array, experts: ExpertWeights, *,
                   valid: jax.Array | None = None, implementation: str = "auto") -> jax.Array:
  """Dropless routed experts: x [T, D], weights / expert_ids / valid [T, W] -> y [T, D].

  y_t = sum_w valid_{t,w} weights_{t,w} E_{expert_ids_{t,w}}(x_t). Invalid entries (e.g. experts held by another
  device) contribute nothing and may carry any id.
  """
  chex.assert_rank(x, 2)
  chex.assert_equal_shape([weights, expert_ids])
  chex.assert_equal_shape_prefix([x, weights], 1)
  num_tokens, choices = expert_ids.shape
  num_experts = experts.num_experts
  weights = weights.astype(x.dtype)
  if valid is not None:
    weights = jnp.where(valid, weights, 0)
  implementation = resolve_implementation(implementation)
  if implementation == "selected":
    ids = expert_ids if valid is None else jnp.where(valid, expert_ids, num_experts)  # out of range: never loaded
    return loop_over_selected(x, weights, ids, num_experts,
                              lambda e: [jax.lax.dynamic_index_in_dim(w, e, keepdims=False) for w in experts])
  if implementation == "dense":
    ids = expert_ids if valid is None else jnp.where(valid, expert_ids, num_experts)
    combine = jnp.zeros((num_tokens, num_experts + 1), x.dtype).at[jnp.arange(num_tokens)[:, None], ids].add(weights)
    every_expert = batched_swiglu(jnp.broadcast_to(x, (num_experts, *x.shape)), experts)
    return jnp.einsum("te,etd->td", combine[:, :num_experts], every_expert)
  order, group_sizes = dispatch.sort_by_expert(expert_ids, num_experts=num_experts, valid=valid)
  token = order // choices
  out = grouped_swiglu(x[token], group_sizes, experts, implementation=implementation)
  return jnp.zeros_like(x).at[token].add(out * weights.reshape(-1)[order][:, None])


def capacity_experts(x: jax.Array, weights: jax.Array, expert_ids: jax.Array, experts: ExpertWeights, *,
                     capacity_factor: float) -> tuple[jax.Array, jax.Array]:
  """Capacity-factor routed experts: x [T, D], weights / expert_ids [T, K] -> (y [T, D], dropped int32 []).

  1. Every expert gets C = ceil(capacity_factor * T K / E) slots.
  2. Slots are filled choice-major: every token's first choice before any second choice (GShard's priority).
  3. Assignments past an expert's C slots are dropped: they add nothing to y and are counted exactly.
  4. The experts run densely on their [E, C, D] buffers, which shard over the `expert` axis as they are.
  """
  chex.assert_rank(x, 2)
  chex.assert_equal_shape([weights, expert_ids])
  num_tokens, k = expert_ids.shape
  num_experts = experts.num_experts
  capacity = dispatch.bucket_capacity(num_tokens * k, num_experts, capacity_factor)
  ids = expert_ids.T.reshape(-1)
  token = jnp.tile(jnp.arange(num_tokens), k)
  slot, keep = dispatch.capacity_slots(ids, num_buckets=num_experts, capacity=capacity)
  destination = jnp.where(keep, ids * capacity + slot, num_experts * capacity)
  buffers = jnp.zeros((num_experts * capacity, x.shape[1]), x.dtype).at[destination].set(x[token], mode="drop")
  buffers = rules.constrain(buffers.reshape(num_experts, capacity, -1), (rules.ACT_EXPERT, None, rules.ACT_EMBED))
  out = batched_swiglu(buffers, experts).reshape(num_experts * capacity, -1)
  gathered = out.at[destination].get(mode="fill", fill_value=0)
  y = jnp.zeros_like(x).at[token].add(gathered * weights.T.reshape(-1)[:, None].astype(x.dtype))
  return y, jnp.sum(~keep).astype(jnp.int32)
