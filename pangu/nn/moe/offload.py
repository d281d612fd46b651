"""Routed experts whose weights stay in host memory and are copied in per call, as inference offloading does.

The baseline the MoLE paper compares against (experts in pinned host memory, each step loads the experts its
tokens selected). Per call, the distinct experts the tokens chose are copied to the device one at a time, and
each is applied to exactly the rows routed to it: one [D] x [D, F] product per (row, choice), the FLOPs of
routing and nothing more (the `selected` loop of pangu.nn.moe.experts would run every loaded expert on all T
rows). Transferred bytes per call: distinct experts x 3 x D x F x the host kernels' itemsize.
"""

import chex
import jax
import jax.numpy as jnp

from pangu.nn.moe.experts import ExpertWeights, selected_experts, swiglu
from pangu.parallel import host_memory


def offloaded_experts(x: jax.Array, weights: jax.Array, expert_ids: jax.Array, host_experts: ExpertWeights,
                      dtype) -> jax.Array:
  """x [T, D], weights / expert_ids [T, K], expert kernels in pinned host memory -> y [T, D].

  Kernels cross to the device in their host dtype and are cast to `dtype` there, so a float16 host copy moves
  half the bytes of a float32 one.
  """
  chex.assert_rank(x, 2)
  chex.assert_equal_shape([weights, expert_ids])
  num_experts = host_experts.num_experts
  order, count = selected_experts(expert_ids, num_experts)
  # Assignments sorted by expert: expert e's rows are the slice [starts[e], starts[e + 1]).
  flat_ids = expert_ids.reshape(-1)
  by_expert = jnp.argsort(flat_ids, stable=True)
  rows = by_expert // expert_ids.shape[1]
  coefs = weights.reshape(-1)[by_expert].astype(x.dtype)
  starts = jnp.searchsorted(flat_ids[by_expert], jnp.arange(num_experts + 1), side="left")

  def load(expert):
    pick = lambda kernels, e: [jax.lax.dynamic_index_in_dim(w, e, keepdims=False) for w in kernels]
    kernels = host_memory.compute_on_host(pick, list(host_experts), host_memory.to_host(expert))
    return [w.astype(dtype) for w in host_memory.to_device(kernels)]

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
