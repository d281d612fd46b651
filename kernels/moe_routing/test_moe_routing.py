"""The fused MoGE routing kernel (interpreted on CPU) against the plain-XLA reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu_kernels import moe_routing
from pangu_kernels.moe_routing import pallas, reference

SHAPES = [
    # (tokens, experts, groups, experts per group, block): Pro MoE's 64 experts over 3 blocks of 16 with a
    # partial last one, and a single partial block with K' = 3 (the ties test covers whole blocks and K' = 2).
    (37, 64, 8, 1, 16),
    (5, 8, 2, 3, 8),
]


def _assert_same_routing(got, want):
  np.testing.assert_array_equal(got.expert_ids, want.expert_ids)
  np.testing.assert_allclose(got.weights, want.weights, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(got.sort_order, want.sort_order)
  np.testing.assert_array_equal(got.group_sizes, want.group_sizes)


@pytest.mark.parametrize("tokens,experts,groups,k_per_group,block", SHAPES)
def test_interpreted_kernel_matches_reference(tokens, experts, groups, k_per_group, block):
  logits = jnp.asarray(np.random.default_rng(tokens).normal(size=(tokens, experts)) * 3, jnp.float32)
  got = pallas.moge_routing(logits, num_groups=groups, k_per_group=k_per_group, block_tokens=block, interpret=True)
  want = reference.moge_routing(logits, num_groups=groups, k_per_group=k_per_group)
  _assert_same_routing(got, want)
  assert got.weights.shape == got.expert_ids.shape == (tokens, groups * k_per_group)
  # The permutation really sorts the assignments by expert, and the offsets delimit each expert's rows.
  flat = np.asarray(want.expert_ids).reshape(-1)
  assert np.all(np.diff(flat[np.asarray(got.sort_order)]) >= 0)
  np.testing.assert_array_equal(got.group_offsets[-1], tokens * groups * k_per_group)


def test_ties_break_to_the_lowest_id_and_bfloat16_logits_route_in_float32():
  logits = jnp.zeros((16, 16), jnp.bfloat16)  # two whole blocks
  got = pallas.moge_routing(logits, num_groups=4, k_per_group=2, block_tokens=8, interpret=True)
  _assert_same_routing(got, reference.moge_routing(logits, num_groups=4, k_per_group=2))
  np.testing.assert_array_equal(got.expert_ids[0], [0, 1, 4, 5, 8, 9, 12, 13])
  assert got.weights.dtype == jnp.float32


def test_dispatcher_picks_the_reference_on_cpu_and_validates():
  assert jax.default_backend() == "cpu" and not moe_routing.pallas_supported(64, 8, 64)
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(12, 8)), jnp.float32)
  _assert_same_routing(moe_routing.moge_routing(logits, num_groups=2, k_per_group=1),
                       reference.moge_routing(logits, num_groups=2, k_per_group=1))
  with pytest.raises(ValueError, match="implementation must be one of"):
    moe_routing.moge_routing(logits, num_groups=2, k_per_group=1, implementation="triton")
  with pytest.raises(ValueError, match="num_groups=3 must divide the 8 experts"):
    moe_routing.moge_routing(logits, num_groups=3, k_per_group=1)
  with pytest.raises(ValueError, match=r"k_per_group=5 must be in \[1, group size 4\]"):
    moe_routing.moge_routing(logits, num_groups=2, k_per_group=5)
