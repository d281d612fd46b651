"""Straggler factors sampled from top-K vs MoGE routing, checked against the real routers."""

import jax
import numpy as np
import pytest

from pangu.nn.moe import routing
from pangu.nn.moe.config import MoEConfig
from pangu.sim import imbalance

TOPK = MoEConfig(num_experts=64, top_k=8, expert_dim=16, router="topk")
MOGE = MoEConfig(num_experts=64, top_k=8, expert_dim=16, router="moge", num_groups=8)


def test_moge_with_whole_groups_per_device_is_exactly_balanced():
  for ep in (1, 2, 4, 8):
    assert imbalance.straggler_factor(MOGE, ep, 16) == 1.0
  # Pro MoE §5 pitfall (derived): with more devices than groups a group spans devices and imbalance returns.
  assert imbalance.straggler_factor(MOGE, 16, 16) > 1.1


def test_topk_straggler_shrinks_with_the_batch():
  factors = [imbalance.straggler_factor(TOPK, 8, tokens) for tokens in (16, 256, 4096, 65536)]
  assert factors[0] > 1.3
  assert all(a > b for a, b in zip(factors, factors[1:]))
  assert factors[-1] == pytest.approx(1.0, abs=0.02)


def test_sampled_loads_match_the_top_k_router_on_random_logits():
  # Uniform routing = top-K of i.i.d. logits: the mean max/mean device load of the real router agrees.
  tokens, ep, draws = 64, 8, 64
  logits = jax.random.normal(jax.random.key(0), (draws, tokens, 64))
  loads = jax.jit(jax.vmap(lambda sample: routing.device_load(routing.topk_route(sample, k=8)[1], num_experts=64,
                                                              num_devices=ep)))(logits)
  peaks = np.asarray(loads.max(axis=1) / loads.mean(axis=1))
  assert imbalance.straggler_factor(TOPK, ep, tokens, samples=256) == pytest.approx(peaks.mean(), rel=0.04)


def test_normal_limit_joins_the_exact_sampler():
  rng = np.random.default_rng(0)
  exact = [imbalance._hypergeometric_loads(rng, 8, 8, 8, imbalance.EXACT_TOKENS).max() for _ in range(400)]
  limit = [imbalance._hypergeometric_loads(rng, 8, 8, 8, imbalance.EXACT_TOKENS + 1).max() for _ in range(400)]
  assert np.mean(limit) == pytest.approx(np.mean(exact), rel=0.01)


def test_expected_distinct_experts():
  assert imbalance.expected_distinct_experts(64, 8, 1) == pytest.approx(8)
  assert imbalance.expected_distinct_experts(64, 8, 10_000) == pytest.approx(64)
