"""Expert parallelism on the 8-device CPU mesh equals the single-device layer, forward and backward."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu.nn import moe
from pangu.parallel import atlas_800t_a2, cpu, cpu_mesh, rules

T, D, F, N = 64, 8, 4, 16
# Hierarchical dispatch: experts over (data = inter-node, expert = intra-node).
NODE_RULES = tuple((name, ("data", "expert") if name == rules.EXPERT else axes) for name, axes in rules.DEFAULT_RULES)


def _config(router, **changes):
  base = dict(num_experts=N, top_k=8, expert_dim=F, router=router, num_groups=8)
  return moe.MoEConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  logits = jnp.asarray(rng.normal(size=(T, N)), jnp.float32)
  probe = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  shapes = [(N, D, F), (N, D, F), (N, F, D)]
  experts = moe.ExpertWeights(*(jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32) for s in shapes))
  return x, logits, probe, experts


def _loss_and_grads(fn, x, weights, experts, probe):
  def loss(x, weights, experts):
    y, *counts = fn(x, weights, experts)
    return jnp.sum(y * probe), (y, *counts)
  return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, weights, experts)


def _numpy_capacity_keep(ids, num_shards, num_devices, capacity_factor):
  """Flat capacity exchange: each token shard fills C slots per destination device, choice-major."""
  t, k = ids.shape
  per_shard, per_device = t // num_shards, N // num_devices
  capacity = math.ceil(capacity_factor * per_shard * k / num_devices)
  keep = np.zeros(ids.shape, bool)
  for shard in range(num_shards):
    used = np.zeros(num_devices, int)
    for choice in range(k):
      for token in range(shard * per_shard, (shard + 1) * per_shard):
        device = ids[token, choice] // per_device
        keep[token, choice] = used[device] < capacity
        used[device] += 1
  return keep


CASES = {
    # name: (router, exchange, mesh axes, logical rules, capacity factor)
    "moge_fixed_all_to_all": ("moge", "fixed", dict(expert=8), rules.DEFAULT_RULES, None),
    "topk_ring": ("topk", "ring", dict(data=2, expert=4), rules.DEFAULT_RULES, None),
    "topk_capacity_with_drops": ("topk", "capacity", dict(data=2, expert=4), rules.DEFAULT_RULES, 1.0),
    "moge_hierarchical": ("moge", "fixed", dict(data=2, expert=4), NODE_RULES, None),
    "topk_hierarchical_capacity": ("topk", "capacity", dict(data=2, expert=4), NODE_RULES, 8.0),
    "moge_fixed_tensor_parallel_experts": ("moge", "fixed", dict(expert=4, tensor=2), rules.DEFAULT_RULES, None),
}
SLOW = set(CASES) - {"moge_fixed_all_to_all", "topk_capacity_with_drops"}  # compile-bound: full tier


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_expert_parallel_forward_and_gradients_equal_single_device(problem, name):
  router, exchange, axes, logical_rules, capacity_factor = CASES[name]
  config = _config(router, dispatch="dropless" if capacity_factor is None else "capacity",
                   capacity_factor=capacity_factor or 1.25, hierarchical_dispatch=logical_rules is NODE_RULES)
  x, logits, probe, experts = problem
  weights, ids = moe.route(logits, config)
  mesh = cpu_mesh(**axes)

  def sharded(x, weights, experts):
    layout = moe.current_layout(config)
    assert layout.num_devices == (8 if logical_rules is NODE_RULES else axes["expert"])
    assert moe.exchange_for(config, layout.num_devices) == exchange
    return moe.expert_parallel_experts(x, weights, ids, experts, config=config, layout=layout)

  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules):
    (_, (y, dropped, received)), grads = jax.jit(lambda *a: _loss_and_grads(sharded, *a, probe))(
        x, weights, experts)

  keep = np.ones(ids.shape, bool)
  if name == "topk_capacity_with_drops":
    keep = _numpy_capacity_keep(np.asarray(ids), num_shards=8, num_devices=4, capacity_factor=1.0)
    assert (~keep).sum() > 0
  assert int(dropped) == int((~keep).sum())
  # Device load counted in the exchange: the kept assignments of each expert device's experts.
  num_devices = len(received)
  want_received = np.bincount(np.asarray(ids)[keep] // (N // num_devices), minlength=num_devices)
  np.testing.assert_array_equal(received, want_received)

  def single(x, weights, experts):
    masked = jnp.where(keep, weights, 0.0)
    return moe.routed_experts(x, masked, ids, experts, implementation="dense"), jnp.zeros((), jnp.int32)

  (_, (want_y, _)), want_grads = jax.jit(lambda *a: _loss_and_grads(single, *a, probe))(x, weights, experts)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def _layout_error(config, axes, logical_rules=rules.DEFAULT_RULES):
  with jax.set_mesh(cpu_mesh(**axes)), nn.logical_axis_rules(logical_rules):
    with pytest.raises(ValueError) as error:
      moe.current_layout(config)
  return str(error.value)


def test_impossible_layouts_fail_clearly():
  assert "(8 devices) does not divide num_experts=12" in _layout_error(
      moe.MoEConfig(num_experts=12, top_k=4, expert_dim=4, router="moge", num_groups=4), dict(expert=8))
  assert "hierarchical_dispatch needs" in _layout_error(_config("moge", hierarchical_dispatch=True), dict(expert=8))
  batch_without_experts = tuple((n, "data" if n == rules.BATCH else a) for n, a in rules.DEFAULT_RULES)
  assert "must also split the batch" in _layout_error(_config("moge"), dict(data=2, expert=4), batch_without_experts)
  four_groups = _config("moge", num_groups=4, top_k=4)
  with jax.set_mesh(cpu_mesh(expert=8)), nn.logical_axis_rules(rules.DEFAULT_RULES):
    with pytest.raises(ValueError, match="num_groups=4 is not divisible by 8 expert devices"):
      moe.expert_parallel_experts(jnp.zeros((8, D)), jnp.zeros((8, 4)), jnp.zeros((8, 4), jnp.int32),
                                  moe.ExpertWeights(*(jnp.zeros((N, 1, 1)),) * 3), config=four_groups,
                                  layout=moe.current_layout(four_groups), exchange="fixed")
  # MoGE with more devices than groups falls back to the exact dropless ring.
  assert moe.exchange_for(four_groups, 8) == "ring"
  with jax.set_mesh(cpu_mesh(data=8)), nn.logical_axis_rules(rules.DEFAULT_RULES):
    assert moe.current_layout(_config("moge")) is None


def test_hierarchical_dispatch_is_chosen_from_the_topology():
  sizes = dict(pipeline=1, data=2, fsdp=1, expert=8, tensor=1)
  mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
  two_nodes = atlas_800t_a2(num_nodes=2)
  assert moe.use_hierarchical_dispatch(two_nodes, mesh, NODE_RULES)
  assert not moe.use_hierarchical_dispatch(two_nodes, mesh, rules.DEFAULT_RULES)  # experts inside one node
  assert not moe.use_hierarchical_dispatch(cpu(16), mesh, NODE_RULES)  # one host: a flat all-to-all
  wide = dict(pipeline=1, data=1, fsdp=1, expert=16, tensor=1)
  wide_mesh = jax.sharding.AbstractMesh(tuple(wide.values()), tuple(wide))
  assert not moe.use_hierarchical_dispatch(two_nodes, wide_mesh, rules.DEFAULT_RULES)  # one axis straddles
