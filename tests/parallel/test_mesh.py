"""Plans, their validation against topologies, and the five-axis Auto mesh on the 8-device CPU host."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pangu.parallel import mesh as mesh_lib
from pangu.parallel import rules
from pangu.parallel import topology
from pangu.parallel.mesh import MESH_AXES, ParallelPlan
from pangu.parallel.topology import AxisSpec, LinkKind, Topology


def _nodes_of(chips: int, nodes: int) -> Topology:
  """An A2-like cluster with `chips` per node, for node sizes the presets lack."""
  a2 = topology.atlas_800t_a2()
  return Topology("test", (
      AxisSpec(name="node", size=nodes, bandwidth=25e9, latency=1.5e-6, kind=LinkKind.CLOS, fabric="RoCE",
               intra_node=False),
      AxisSpec(name="npu", size=chips, bandwidth=196e9, latency=0.5e-6, kind=LinkKind.FULL_MESH, fabric="HCCS",
               intra_node=True),
  ), a2.device)


def test_mesh_axes_run_outer_to_inner():
  assert MESH_AXES == ("pipeline", "data", "fsdp", "expert", "tensor")


def test_plan_sizes_and_validation():
  plan = ParallelPlan(data=2, tensor=4)
  assert plan.num_devices == 8
  assert list(plan.axis_sizes.items()) == [("pipeline", 1), ("data", 2), ("fsdp", 1), ("expert", 1), ("tensor", 4)]
  with pytest.raises(ValueError, match="ParallelPlan.tensor must be a positive int, got 0"):
    ParallelPlan(tensor=0)
  with pytest.raises(ValueError, match="ParallelPlan.data must be a positive int, got 2.0"):
    ParallelPlan(data=2.0)


def test_device_count_mismatch_names_both_numbers():
  with pytest.raises(ValueError, match="plan data=4 uses 4 devices but atlas-800t-a2 has 16"):
    mesh_lib.validate_plan(topology.atlas_800t_a2(num_nodes=2), ParallelPlan(data=4))


def test_single_device_mesh_holds_the_first_or_the_given_device():
  first, other = jax.devices()[0], jax.devices()[3]
  assert mesh_lib.single_device_mesh().devices.ravel().tolist() == [first]
  assert mesh_lib.single_device_mesh(other).devices.ravel().tolist() == [other]
  assert set(mesh_lib.single_device_mesh(other).shape.values()) == {1}


def test_tensor_parallelism_may_not_leave_a_node():
  with pytest.raises(ValueError, match="tensor=16 spans 2 nodes of 8 chips: its all-reduces would cross RoCE"):
    mesh_lib.validate_plan(topology.atlas_800t_a2(num_nodes=2), ParallelPlan(tensor=16))
  with pytest.raises(ValueError, match="tensor=4 does not divide the 6 chips of a node"):
    mesh_lib.validate_plan(_nodes_of(chips=6, nodes=2), ParallelPlan(data=3, tensor=4))


def test_expert_groups_may_not_straddle_nodes():
  with pytest.raises(ValueError, match="tensor x expert = 4 does not divide the 6 chips"):
    mesh_lib.validate_plan(_nodes_of(chips=6, nodes=2), ParallelPlan(data=3, expert=4))
  with pytest.raises(ValueError, match="tensor x expert = 8 is not a whole number of nodes of 6 chips"):
    mesh_lib.validate_plan(_nodes_of(chips=6, nodes=4), ParallelPlan(data=3, tensor=2, expert=4))


def test_expert_groups_of_whole_nodes_warn():
  warnings = mesh_lib.validate_plan(topology.atlas_800t_a2(num_nodes=4), ParallelPlan(data=2, tensor=2, expert=8))
  assert warnings == ["expert=8 (x tensor=2) spans 2 nodes of 8 chips: token dispatch crosses RoCE"]
  assert mesh_lib.validate_plan(topology.atlas_800t_a2(num_nodes=4), ParallelPlan(data=4, expert=8)) == []


def test_cpu_host_is_one_node(n_devices):
  assert mesh_lib.validate_plan(topology.cpu(), ParallelPlan(tensor=n_devices)) == []


def test_bf16_plan_on_300i_duo_fails():
  with pytest.raises(ValueError, match="Ascend 310P3 does not support bfloat16"):
    mesh_lib.validate_plan(topology.atlas_300i_duo(), ParallelPlan(data=2, tensor=4), dtype=jnp.bfloat16)
  assert mesh_lib.validate_plan(topology.atlas_300i_duo(), ParallelPlan(data=2, tensor=4), dtype="float16") == []


def test_mesh_keeps_all_axes_as_auto():
  mesh = mesh_lib.cpu_mesh(data=4, tensor=2)
  assert mesh.axis_names == MESH_AXES
  assert dict(mesh.shape) == {"pipeline": 1, "data": 4, "fsdp": 1, "expert": 1, "tensor": 2}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 5


def test_inner_axes_are_neighbouring_devices():
  mesh = mesh_lib.cpu_mesh(data=2, fsdp=2, tensor=2)
  ids = np.vectorize(lambda device: device.id)(mesh.devices)
  order = np.array([device.id for device in jax.devices()])
  # tensor pairs are neighbours, fsdp steps over a tensor pair, data over an fsdp x tensor block.
  np.testing.assert_array_equal(ids, order.reshape(1, 2, 2, 1, 2))
  assert ids[0, 0, 0, 0, 1] - ids[0, 0, 0, 0, 0] == 1


def test_partition_specs_can_name_every_axis():
  mesh = mesh_lib.cpu_mesh(data=2, fsdp=2, tensor=2)
  x = jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, P(("pipeline", "data", "fsdp", "expert"), "tensor")))
  assert x.sharding.shard_shape(x.shape) == (2, 2)


def test_make_mesh_on_an_ascend_preset_and_device_subsets(n_devices):
  mesh = mesh_lib.make_mesh(topology.atlas_800t_a2(), ParallelPlan(expert=2, tensor=4))
  assert dict(mesh.shape)["tensor"] == 4
  half = jax.devices()[:n_devices // 2]
  mesh = mesh_lib.make_mesh(topology.cpu(len(half)), ParallelPlan(tensor=len(half)), devices=half)
  assert list(mesh.devices.flat) == half
  with pytest.raises(ValueError, match="plan tensor=4 needs 4 devices, got 8"):
    mesh_lib.make_mesh(topology.cpu(4), ParallelPlan(tensor=4))


def test_require_no_pipeline_names_the_caller_and_the_pipeline_size():
  mesh_lib.require_no_pipeline(mesh_lib.cpu_mesh(data=2, fsdp=2, tensor=2), "the engine")
  with pytest.raises(ValueError, match="the engine does not support pipeline parallelism: the mesh has pipeline=4"):
    mesh_lib.require_no_pipeline(mesh_lib.cpu_mesh(pipeline=4, tensor=2), "the engine")


def test_split_ways_counts_the_active_mesh_parts_of_logical_axes():
  # The batch goes over data x fsdp x expert, the length over nothing; no mesh means one part.
  seen = {}

  def record(x):
    seen["batch"] = rules.split_ways(rules.BATCH)
    seen["batch_length"] = rules.split_ways(rules.BATCH, rules.LENGTH)
    seen["mlp"] = rules.split_ways(rules.ACT_MLP)
    return x

  with jax.set_mesh(mesh_lib.cpu_mesh(data=2, fsdp=2, tensor=2)), nn.logical_axis_rules(rules.DEFAULT_RULES):
    jax.jit(record)(0.0)
  assert seen == {"batch": 4, "batch_length": 4, "mlp": 2}
  jax.jit(record).lower(1.0)
  assert seen == {"batch": 1, "batch_length": 1, "mlp": 1}
