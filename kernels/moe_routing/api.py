"""MoGE routing with the dispatch permutation, choosing the fused Pallas kernel where it compiles."""

import jax

from pangu_kernels.moe_routing import pallas, reference
from pangu_kernels.moe_routing.reference import MoGERouting

IMPLEMENTATIONS = ("pallas", "xla")


def _is_power_of_two(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def pallas_supported(num_experts: int, top_k: int, block_tokens: int) -> bool:
  """Whether the kernel compiles here: GPU (Triton: power-of-two blocks, matmul dims >= 16) or TPU."""
  backend = jax.default_backend()
  if backend == "tpu":
    return True
  return (backend == "gpu" and all(map(_is_power_of_two, (num_experts, top_k, block_tokens)))
          and min(num_experts, block_tokens) >= 16)


def moge_routing(logits: jax.Array, *, num_groups: int, k_per_group: int, implementation: str | None = None,
                 block_tokens: int = pallas.DEFAULT_BLOCK_TOKENS) -> MoGERouting:
  """logits [T, N] -> MoGERouting (weights, expert_ids [T, K], sort_order [T K], group_sizes [N]).

  implementation: `pallas` (the fused kernel; interpreted on CPU), `xla` (the reference) or None: the kernel
  where `pallas_supported`, else the reference. Both give the same ids, order and sizes.
  """
  if implementation is None:
    implementation = ("pallas" if pallas_supported(logits.shape[1], num_groups * k_per_group, block_tokens)
                      else "xla")
  if implementation == "xla":
    return reference.moge_routing(logits, num_groups=num_groups, k_per_group=k_per_group)
  if implementation == "pallas":
    return pallas.moge_routing(logits, num_groups=num_groups, k_per_group=k_per_group, block_tokens=block_tokens,
                               interpret=jax.default_backend() == "cpu")
  raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
