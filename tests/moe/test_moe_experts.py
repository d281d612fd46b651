import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu.nn import moe
from pangu_kernels import moe_routing

T, D, F, N = 40, 8, 6, 8


def _experts(rng, n=N, d=D, f=F):
  shapes = [(n, d, f), (n, d, f), (n, f, d)]
  return moe.ExpertWeights(*(jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32) for s in shapes))


def _numpy_expert(x, experts, e):
  gate, up, down = (np.asarray(w[e], np.float64) for w in experts)
  h = x @ gate
  return (h / (1 + np.exp(-h)) * (x @ up)) @ down


def _numpy_routed(x, weights, ids, experts, keep=None):
  """Float64 y_t = sum_k keep w_{t,k} E_{e_{t,k}}(x_t), one token at a time."""
  x = np.asarray(x, np.float64)
  keep = np.ones(ids.shape, bool) if keep is None else keep
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for k in range(ids.shape[1]):
      if keep[t, k]:
        y[t] += weights[t, k] * _numpy_expert(x[t], experts, ids[t, k])
  return y


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  # Skewed routing so that some experts get many rows, one gets none, and some groups cross block edges.
  ids = np.stack([rng.choice(N - 1, size=3, replace=False, p=np.linspace(1, 3, N - 1) / np.linspace(1, 3, N - 1).sum())
                  for _ in range(T)]).astype(np.int32)
  weights = rng.uniform(0.1, 1.0, ids.shape).astype(np.float32)
  return x, jnp.asarray(weights), jnp.asarray(ids), _experts(rng)


routed = jax.jit(moe.routed_experts, static_argnames="implementation")


@pytest.mark.parametrize("implementation", ["dense", "ragged", "blocked", "selected"])
def test_routed_experts_match_float64_numpy(problem, implementation):
  x, weights, ids, experts = problem
  got = routed(x, weights, ids, experts, implementation=implementation)
  np.testing.assert_allclose(got, _numpy_routed(x, np.asarray(weights), np.asarray(ids), experts), atol=1e-5,
                             rtol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _gradients(implementation, x, weights, ids, experts, probe):
  loss = lambda x, w, e: jnp.sum(moe.routed_experts(x, w, ids, e, implementation=implementation) * probe)
  return jax.grad(loss, argnums=(0, 1, 2))(x, weights, experts)


@pytest.mark.parametrize("implementation", ["blocked", pytest.param("ragged", marks=pytest.mark.slow)])
def test_grouped_gradients_match_dense_reference(problem, implementation):
  x, weights, ids, experts = problem
  probe = jnp.asarray(np.random.default_rng(1).normal(size=(T, D)), jnp.float32)
  for got, want in zip(jax.tree.leaves(_gradients(implementation, x, weights, ids, experts, probe)),
                       jax.tree.leaves(_gradients("dense", x, weights, ids, experts, probe))):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["blocked", "selected"])
def test_invalid_assignments_contribute_nothing(problem, implementation):
  x, weights, ids, experts = problem
  valid = np.random.default_rng(2).random(ids.shape) < 0.6
  got = routed(x, weights, jnp.where(valid, ids, 99), experts, valid=jnp.asarray(valid),
               implementation=implementation)
  want = _numpy_routed(x, np.asarray(weights), np.asarray(ids), experts, keep=valid)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_dropless_sort_keeps_every_assignment_once(problem):
  _, _, ids, _ = problem
  order, sizes = jax.jit(moe.sort_by_expert, static_argnames="num_experts")(ids, num_experts=N)
  flat = np.asarray(ids).reshape(-1)
  assert sorted(np.asarray(order).tolist()) == list(range(flat.size))  # a permutation: nothing lost
  np.testing.assert_array_equal(sizes, np.bincount(flat, minlength=N))
  np.testing.assert_array_equal(flat[np.asarray(order)], np.sort(flat, kind="stable"))
  # Inside an expert the tokens keep their order (a stable sort), which the fused routing kernel relies on.
  assert np.all(np.diff(np.asarray(order)[flat[np.asarray(order)] == 2]) > 0)


def test_routing_kernel_order_is_the_dispatch_order():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(30, 16)), jnp.float32)
  routing, (order, sizes) = jax.jit(lambda x: (
      (r := moe_routing.moge_routing(x, num_groups=4, k_per_group=1, implementation="xla")),
      moe.sort_by_expert(r.expert_ids, num_experts=16)))(logits)
  np.testing.assert_array_equal(routing.sort_order, order)
  np.testing.assert_array_equal(routing.group_sizes, sizes)


def test_capacity_slots_first_come_first_served():
  # Buckets of capacity 2; id 3 is outside the 3 buckets, so it is neither kept nor dropped.
  slot, keep = jax.jit(moe.capacity_slots, static_argnames=("num_buckets", "capacity"))(
      jnp.array([0, 1, 0, 0, 3, 1, 0]), num_buckets=3, capacity=2)
  np.testing.assert_array_equal(np.asarray(slot)[[0, 1, 2, 3, 5, 6]], [0, 0, 1, 2, 1, 3])
  np.testing.assert_array_equal(keep, [True, True, True, False, False, True, False])


def _numpy_capacity_keep(ids, num_buckets, capacity, bucket_of=lambda e: e):
  """Choice-major first-come-first-served slots: every token's first choice before any second choice."""
  keep = np.zeros(ids.shape, bool)
  used = np.zeros(num_buckets, int)
  for k in range(ids.shape[1]):
    for t in range(ids.shape[0]):
      b = bucket_of(ids[t, k])
      keep[t, k] = used[b] < capacity
      used[b] += 1
  return keep


@pytest.mark.parametrize("capacity_factor", [1.0, 4.0])
def test_capacity_variant_drops_exactly_the_overflow(problem, capacity_factor):
  x, weights, ids, experts = problem
  y, dropped = jax.jit(moe.capacity_experts, static_argnames="capacity_factor")(
      x, weights, ids, experts, capacity_factor=capacity_factor)
  capacity = math.ceil(capacity_factor * ids.size / N)
  keep = _numpy_capacity_keep(np.asarray(ids), N, capacity)
  assert int(dropped) == int((~keep).sum())
  assert (int(dropped) > 0) == (capacity_factor < 4.0)
  np.testing.assert_allclose(y, _numpy_routed(x, np.asarray(weights), np.asarray(ids), experts, keep=keep),
                             atol=1e-5, rtol=1e-5)
