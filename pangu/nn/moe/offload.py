"""Routed experts whose weights stay in host memory and are copied in per call, as inference offloading does.

The baseline the MoLE paper compares against (experts in pinned host memory, each step loads the experts its
tokens selected). Per call, the distinct experts the tokens chose are copied to the device one at a time, and
each is applied to exactly the rows routed to it (the `selected` loop of pangu.nn.moe.experts: one [D] x [D, F]
product per (row, choice), the FLOPs of routing). Transferred bytes per call: distinct experts x 3 x D x F x the
host kernels' itemsize.
"""

import chex
import jax

from pangu.nn.moe.experts import ExpertWeights, loop_over_selected
from pangu.parallel import host_memory


def offloaded_experts(x: jax.Array, weights: jax.Array, expert_ids: jax.Array, host_experts: ExpertWeights,
                      dtype) -> jax.Array:
  """x [T, D], weights / expert_ids [T, K], expert kernels in pinned host memory -> y [T, D].

  Kernels cross to the device in their host dtype and are cast to `dtype` there, so a float16 host copy moves
  half the bytes of a float32 one.
  """
  chex.assert_rank(x, 2)
  chex.assert_equal_shape([weights, expert_ids])

  def load(expert):
    pick = lambda kernels, e: [jax.lax.dynamic_index_in_dim(w, e, keepdims=False) for w in kernels]
    kernels = host_memory.compute_on_host(pick, list(host_experts), host_memory.to_host(expert))
    return [w.astype(dtype) for w in host_memory.to_device(kernels)]

  return loop_over_selected(x, weights, expert_ids, host_experts.num_experts, load)
