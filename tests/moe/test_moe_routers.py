import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu.nn import moe
from pangu.parallel import cpu_mesh, rules

# One compiled program per call instead of one per primitive: eager dispatch compiles every op separately.
moge_route = jax.jit(moe.moge_route, static_argnames=("num_groups", "k_per_group"))
topk_route = jax.jit(moe.topk_route, static_argnames="k")
group_limited_route = jax.jit(moe.group_limited_route, static_argnames=("num_groups", "topk_groups", "k"))
imbalance_score = jax.jit(moe.imbalance_score, static_argnames=("num_experts", "num_devices"))
balance_loss = jax.jit(moe.balance_loss, static_argnames="top_k")
route = jax.jit(moe.route, static_argnums=1)

def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("num_groups,k_per_group", [(4, 1), (4, 2), (2, 3), (1, 4)])
def test_moge_picks_k_per_group_with_global_softmax_weights(num_groups, k_per_group):
  t, n = 50, 12 if num_groups != 4 else 16
  logits = np.random.default_rng(num_groups * 10 + k_per_group).normal(size=(t, n)).astype(np.float32)
  weights, ids = moge_route(jnp.asarray(logits), num_groups=num_groups, k_per_group=k_per_group)
  weights, ids = np.asarray(weights), np.asarray(ids)
  assert ids.shape == weights.shape == (t, num_groups * k_per_group)
  probs = _softmax(logits.astype(np.float64))
  g = n // num_groups
  for token in range(t):
    per_group = ids[token].reshape(num_groups, k_per_group)
    for group in range(num_groups):
      chosen = per_group[group]
      assert np.all(chosen // g == group) and len(set(chosen)) == k_per_group
      best = group * g + np.argsort(-probs[token, group * g:(group + 1) * g], kind="stable")[:k_per_group]
      np.testing.assert_array_equal(chosen, best)
  np.testing.assert_allclose(weights, np.take_along_axis(probs, ids, axis=1), rtol=1e-6)
  assert np.all(weights.sum(-1) < 1.0)  # no renormalisation


def test_hand_computed_routes():
  # One token, N = 4 experts in M = 2 groups {0, 1}, {2, 3}; logits (2, 1, 0, 3).
  # Global softmax p = e^(2, 1, 0, 3) / (e^2 + e + 1 + e^3) = (0.2369, 0.0871, 0.0321, 0.6439).
  logits = jnp.array([[2.0, 1.0, 0.0, 3.0]])
  p = np.exp([2, 1, 0, 3]) / np.exp([2, 1, 0, 3]).sum()
  # MoGE, K' = 1: expert 0 from group 0, expert 3 from group 1, weights p_0 and p_3 (sum 0.88 < 1).
  w, ids = moge_route(logits, num_groups=2, k_per_group=1)
  np.testing.assert_array_equal(ids, [[0, 3]])
  np.testing.assert_allclose(w, [[p[0], p[3]]], rtol=1e-6)
  # Plain top-2: experts 3 and 0, softmax over their logits only: (e^3, e^2) / (e^3 + e^2) = (0.7311, 0.2689).
  w, ids = topk_route(logits, k=2)
  np.testing.assert_array_equal(ids, [[3, 0]])
  np.testing.assert_allclose(w, [[1 / (1 + np.e ** -1), 1 / (1 + np.e)]], rtol=1e-6)
  # Group-limited top-2 with one group: group 1 holds the best score (0.6439 > 0.2369), so both experts come
  # from it: 3 then 2, weighted by their global p (0.6439, 0.0321).
  w, ids = group_limited_route(logits, num_groups=2, topk_groups=1, k=2)
  np.testing.assert_array_equal(ids, [[3, 2]])
  np.testing.assert_allclose(w, [[p[3], p[2]]], rtol=1e-6)


def test_ties_break_to_the_lowest_expert_id():
  w, ids = moge_route(jnp.zeros((3, 8)), num_groups=4, k_per_group=1)
  np.testing.assert_array_equal(ids, np.tile([0, 2, 4, 6], (3, 1)))
  np.testing.assert_allclose(w, 1 / 8)


def test_router_scale_multiplies_the_selected_weights():
  config = moe.MoEConfig(num_experts=8, top_k=4, expert_dim=4, num_groups=4, router_scale=True)
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(6, 8)), jnp.float32)
  scale = jnp.arange(1.0, 9.0)
  w, ids = route(logits, config, scale)
  w0, ids0 = route(logits, config)
  np.testing.assert_array_equal(ids, ids0)
  np.testing.assert_allclose(w, w0 * np.asarray(scale)[np.asarray(ids0)], rtol=1e-6)


def _numpy_imbalance_score(ids, num_experts, num_devices):
  per_device = np.bincount(ids.reshape(-1) // (num_experts // num_devices), minlength=num_devices)
  return (per_device.max() - per_device.min()) / ids.shape[0]


def test_imbalance_score_matches_numpy():
  rng = np.random.default_rng(0)
  for t, n, k, d in [(16, 64, 8, 8), (7, 24, 8, 4), (100, 16, 2, 2)]:
    ids = np.argsort(rng.random((t, n)), axis=1)[:, :k]  # k distinct experts per token
    got = imbalance_score(jnp.asarray(ids), num_experts=n, num_devices=d)
    np.testing.assert_allclose(got, _numpy_imbalance_score(ids, n, d), rtol=1e-6)
  # Every token on expert 0: device 0 handles all 4 assignments, device 1 none.
  assert float(imbalance_score(jnp.zeros((4, 1), jnp.int32), num_experts=4, num_devices=2)) == 1.0


def test_imbalance_score_of_figure_2a():
  # 24 experts, top-8, EP = 4 (6 experts per device). Top-K may pick experts 0-3 and 12-15: devices 0 and 2
  # get 4 each, devices 1 and 3 none, IS = (4 - 0) / 1. MoGE with 4 groups of 6 picks 2 per group: IS = 0.
  topk = jnp.array([[0, 1, 2, 3, 12, 13, 14, 15]])
  assert float(imbalance_score(topk, num_experts=24, num_devices=4)) == 4.0
  _, moge = moge_route(jnp.asarray(np.random.default_rng(0).normal(size=(5, 24))), num_groups=4,
                           k_per_group=2)
  assert float(imbalance_score(moge, num_experts=24, num_devices=4)) == 0.0


def test_balance_loss_formula_uniform_value_and_gradient():
  t, n, k = 32, 8, 2
  rng = np.random.default_rng(0)
  scores = _softmax(rng.normal(size=(t, n)))
  ids = np.argsort(rng.random((t, n)), axis=1)[:, :k]
  f = n / (k * t) * np.bincount(ids.reshape(-1), minlength=n)
  p = scores.mean(0)
  np.testing.assert_allclose(balance_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(ids), top_k=k),
                             np.sum(f * p), rtol=1e-5)
  # Gradients flow through p only: d/dS_{t,i} = f_i / T.
  grad = jax.jit(jax.grad(lambda s: moe.balance_loss(s, ids, top_k=k)))(jnp.asarray(scores, jnp.float32))
  np.testing.assert_allclose(grad, np.broadcast_to(f / t, (t, n)), rtol=1e-5)
  # Perfectly uniform routing: every expert gets T K / N assignments and p_i = 1 / N, so the loss is 1.
  uniform_ids = np.arange(t * k).reshape(t, k) % n
  uniform = jnp.full((t, n), 1 / n)
  np.testing.assert_allclose(balance_loss(uniform, jnp.asarray(uniform_ids), top_k=k), 1.0, rtol=1e-6)


def test_balance_loss_per_token_group_is_the_mean_of_each_groups_loss():
  t, n, k, groups = 24, 6, 2, 3
  rng = np.random.default_rng(2)
  scores = _softmax(rng.normal(size=(t, n)))
  ids = np.argsort(rng.random((t, n)), axis=1)[:, :k]

  def one_group(s, i):
    return np.sum(n / (k * len(s)) * np.bincount(i.reshape(-1), minlength=n) * s.mean(0))

  want = np.mean([one_group(s, i) for s, i in zip(np.split(scores, groups), np.split(ids, groups))])
  got = jax.jit(moe.balance_loss, static_argnames=("top_k", "token_groups"))(
      jnp.asarray(scores, jnp.float32), jnp.asarray(ids), top_k=k, token_groups=groups)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match="do not split into token_groups=5"):
    moe.balance_loss(jnp.asarray(scores), jnp.asarray(ids), top_k=k, token_groups=5)


@pytest.mark.parametrize("scope, axes, want", [
    ("global_batch", dict(data=2, expert=4), 1), ("ep_group", dict(data=2, expert=4), 2),
    ("microbatch", dict(data=2, expert=4), 8), ("ep_group", dict(expert=8), 1), ("microbatch", dict(data=8), 8)])
def test_balance_scope_token_groups_follow_the_mesh(scope, axes, want):
  config = moe.MoEConfig(num_experts=8, top_k=2, expert_dim=4, router="topk", balance_scope=scope)
  with jax.set_mesh(cpu_mesh(**axes)), nn.logical_axis_rules(rules.DEFAULT_RULES):
    assert moe.balance_token_groups(config) == want
  assert moe.balance_token_groups(config) == 1  # no mesh: one group


def test_unknown_balance_scope_is_named():
  with pytest.raises(ValueError, match="balance_scope"):
    moe.MoEConfig(num_experts=8, top_k=2, expert_dim=4, balance_scope="device")


def test_group_local_scores_and_z_loss():
  logits = np.random.default_rng(1).normal(size=(5, 8))
  local, z_loss = jax.jit(lambda x: (moe.balance_scores(x, num_groups=2, aux_scores="group_local"),
                                     moe.router_z_loss(x)))(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(local, _softmax(logits.reshape(5, 2, 4)).reshape(5, 8), rtol=1e-5)
  np.testing.assert_allclose(z_loss, np.mean(np.log(np.exp(logits).sum(-1)) ** 2), rtol=1e-5)


@pytest.mark.parametrize("changes,message", [
    (dict(num_experts=12, num_groups=8), "num_experts=12 is not divisible by num_groups=8"),
    (dict(top_k=12, num_groups=4), "top_k=12 asks for K'=3 experts per group, more than the group size 2"),
    (dict(top_k=6), "top_k=6 is not divisible by num_groups=4"),
    (dict(router="group_limited"), "topk_groups must be in [1, num_groups=4]"),
    (dict(router="topk", topk_groups=2), "topk_groups is only used by group_limited"),
    (dict(router="group_limited", topk_groups=1, top_k=4), "top_k=4 exceeds the 2 experts"),
    (dict(dispatch="drop"), "MoEConfig.dispatch must be one of"),
    (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
    (dict(expert_dim=0), "MoEConfig.expert_dim must be a positive int"),
])
def test_impossible_configs_fail_clearly(changes, message):
  base = dict(num_experts=8, top_k=4, expert_dim=4, router="moge", num_groups=4)
  with pytest.raises(ValueError, match=re.escape(message)):
    moe.MoEConfig(**{**base, **changes})


def test_moge_route_rejects_bad_groups():
  with pytest.raises(ValueError, match="not divisible by num_groups=3"):
    moge_route(jnp.zeros((2, 8)), num_groups=3, k_per_group=1)
  with pytest.raises(ValueError, match=r"k_per_group=3 must be in \[1, group size 2\]"):
    moge_route(jnp.zeros((2, 8)), num_groups=4, k_per_group=3)
