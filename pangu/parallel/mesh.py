"""Parallelism plans and the device mesh they become.

Every mesh has the same five axes, outer -> inner, so that partition specs can always name all of them:
pipeline, data, fsdp, expert, tensor. `jax.make_mesh` keeps inner axes on neighbouring device ids, so with
node-major device order tensor and expert groups sit inside a node, on its fast fabric (HCCS, UB), while data,
fsdp and pipeline traffic crosses nodes. All axes are `AxisType.Auto`: the code base shards with sharding
constraints on Auto axes, one mode chosen in this one place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from absl import logging
from jax.typing import DTypeLike

from pangu.config_checks import positive_ints
from pangu.parallel.topology import Topology, cpu

MESH_AXES = ("pipeline", "data", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
  """Degree of each kind of parallelism; their product is the number of devices.

  Attributes:
    data: replicas that split the batch and all-reduce gradients.
    fsdp: shards of parameters and optimiser state, gathered per layer (ZeRO-3 style).
    tensor: shards of each matmul (Megatron style); all-reduces activations every layer, so intra-node only.
    expert: devices that split the experts of a MoE layer and exchange tokens by all-to-all.
    pipeline: stages of consecutive layers.
  """

  data: int = 1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  pipeline: int = 1

  def __post_init__(self):
    positive_ints(self, *MESH_AXES)

  @property
  def axis_sizes(self) -> dict[str, int]:
    return {name: getattr(self, name) for name in MESH_AXES}

  @property
  def num_devices(self) -> int:
    return math.prod(self.axis_sizes.values())


def _describe(plan: ParallelPlan) -> str:
  return " x ".join(f"{name}={size}" for name, size in plan.axis_sizes.items() if size > 1) or "one device"


def validate_plan(topology: Topology, plan: ParallelPlan, *, dtype: DTypeLike | None = None) -> list[str]:
  """Checks that `plan` fits `topology`; returns warnings and raises ValueError for plans that cannot work.

  Hard errors: a device count that differs from the topology's; a tensor group that leaves a node or straddles
  two (its per-layer all-reduces would cross the slow inter-node link); a tensor x expert group that straddles
  a node boundary; a compute `dtype` the device lacks (bf16 on the 300I Duo). A tensor x expert group made of
  whole nodes is allowed with a warning: expert dispatch then crosses nodes, as in Pangu Ultra MoE's
  hierarchical all-to-all and CloudMatrix384's EP320.
  """
  if plan.num_devices != topology.num_devices:
    raise ValueError(f"plan {_describe(plan)} uses {plan.num_devices} devices but {topology.name} has "
                     f"{topology.num_devices}")
  if dtype is not None:
    topology.device.peak_flops(dtype)  # raises for an unsupported dtype
  per_node = topology.chips_per_node
  inter_node = [axis for axis in topology.axes if not axis.intra_node]
  fabric = inter_node[-1].fabric if inter_node else "the host"
  if plan.tensor > per_node:
    raise ValueError(f"tensor={plan.tensor} spans {math.ceil(plan.tensor / per_node)} nodes of {per_node} chips: "
                     f"its all-reduces would cross {fabric}")
  if per_node % plan.tensor:
    raise ValueError(f"tensor={plan.tensor} does not divide the {per_node} chips of a node: some tensor groups "
                     f"would straddle two nodes and all-reduce over {fabric}")
  group = plan.tensor * plan.expert
  warnings = []
  if group <= per_node and per_node % group:
    raise ValueError(f"tensor x expert = {group} does not divide the {per_node} chips of a node: some expert "
                     f"groups would straddle two nodes")
  if group > per_node:
    if group % per_node:
      raise ValueError(f"tensor x expert = {group} is not a whole number of nodes of {per_node} chips: some expert "
                       f"groups would straddle a node boundary")
    warnings.append(f"expert={plan.expert} (x tensor={plan.tensor}) spans {group // per_node} nodes of {per_node} "
                    f"chips: token dispatch crosses {fabric}")
  return warnings


def make_mesh(topology: Topology,
              plan: ParallelPlan,
              devices: Sequence[jax.Device] | None = None,
              *,
              dtype: DTypeLike | None = None) -> jax.sharding.Mesh:
  """The five-axis Auto mesh for `plan`, after `validate_plan` (warnings go to the log)."""
  for warning in validate_plan(topology, plan, dtype=dtype):
    logging.warning("%s: %s", topology.name, warning)
  devices = jax.devices() if devices is None else list(devices)
  if len(devices) != plan.num_devices:
    raise ValueError(f"plan {_describe(plan)} needs {plan.num_devices} devices, got {len(devices)}")
  return jax.make_mesh(
      tuple(plan.axis_sizes.values()),
      MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
      devices=devices,
  )


def cpu_mesh(**plan_sizes: int) -> jax.sharding.Mesh:
  """A mesh over all local JAX devices treated as one CPU host, e.g. `cpu_mesh(data=2, fsdp=2, tensor=2)`."""
  return make_mesh(cpu(len(jax.devices())), ParallelPlan(**plan_sizes))


def single_device_mesh(device: jax.Device | None = None) -> jax.sharding.Mesh:
  """A mesh over one device alone (default: the first): the reference layout sharded runs are compared with, or
  one of several independent runs side by side."""
  return make_mesh(cpu(1), ParallelPlan(), devices=[jax.devices()[0] if device is None else device])


def require_no_pipeline(mesh: jax.sharding.Mesh, what: str) -> None:
  """Raises for a mesh with pipeline > 1: nothing splits layers into stages yet, so every stage would silently
  repeat the whole model's work."""
  stages = mesh.shape.get("pipeline", 1)
  if stages > 1:
    raise ValueError(f"{what} does not support pipeline parallelism: the mesh has pipeline={stages}; put those "
                     f"devices on the data or fsdp axis instead")
