"""Where each parallel group lives on the device grid, as a small `Topology` per group for the α–β costs.

Megatron's rank order puts the chattiest groups on neighbouring devices: TP innermost (on the node's fast
fabric), then the data-parallel part of EP, CP, the rest of DP and PP outermost. `place` walks the topology's
axes inner -> outer and hands each group its devices in that order. A group gets a piece of every physical
axis it covers, e.g. EP = 4 after TP = 8 on an Atlas 800T A2 pod takes 4 nodes on the RoCE `node` axis; a
group that spills over a node boundary gets a piece of both axes and its collectives decompose
hierarchically (`pangu.parallel.collectives`). With expert tensor parallelism below TP the expert layer's
groups fold over the same ranks: its ETP group is the innermost part of the TP group and its EP group the
rest of the TP group plus the data-parallel EP ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from pangu.parallel.topology import AxisSpec, Topology
from pangu.sim.plan import Infeasible, Plan

# Inner -> outer. "ep_dp" are the data-parallel ranks of one expert-parallel group, "dp_rest" the others.
PLACEMENT_ORDER = ("tp", "ep_dp", "cp", "dp_rest", "pp")


def _subgrid(topology: Topology, name: str, pieces: list[AxisSpec]) -> Topology:
  """A topology of the pieces (outer -> inner); pieces of one physical axis merge into one axis."""
  merged: dict[str, AxisSpec] = {}
  for piece in pieces:
    if piece.name in merged:
      piece = dataclasses.replace(piece, size=piece.size * merged[piece.name].size)
    merged[piece.name] = piece
  order = {axis.name: index for index, axis in enumerate(topology.axes)}
  axes = tuple(sorted(merged.values(), key=lambda axis: order[axis.name]))
  if not axes:  # a group of one device: any single-device axis prices every collective at zero
    axes = (dataclasses.replace(topology.axes[-1], size=1),)
  return Topology(f"{topology.name}/{name}", axes, topology.device)


@dataclasses.dataclass(frozen=True)
class Placement:
  """The sub-grid of every group one device belongs to.

  Attributes:
    groups: "tp", "etp" (expert tensor parallelism), "ep", "cp", "pp", "data" (all ranks holding the same dense
      weights: dp · cp) and "expert_data" (ranks holding the same expert shard), each a `Topology` of the
      pieces it covers.
  """

  groups: dict[str, Topology]

  def __getitem__(self, name: str) -> Topology:
    return self.groups[name]


def place(topology: Topology, plan: Plan) -> Placement:
  """Assigns the plan's groups to the topology's axes; Infeasible when a group cannot tile an axis evenly."""
  if plan.num_devices != topology.num_devices:
    raise Infeasible("placement", f"plan uses {plan.num_devices} devices, {topology.name} has {topology.num_devices}")
  return _place(topology, plan.tp, plan.etp, plan.ep_from_dp, plan.cp, plan.dp // plan.ep_from_dp, plan.pp)


@functools.lru_cache(maxsize=4096)
def _place(topology: Topology, tp: int, etp: int, ep_dp: int, cp: int, dp_rest: int, pp: int) -> Placement:
  """`place` for the group sizes alone (a search meets the same sizes many times)."""
  sizes = {"tp": tp, "ep_dp": ep_dp, "cp": cp, "dp_rest": dp_rest, "pp": pp}
  free = [[axis, axis.size] for axis in reversed(topology.axes)]  # inner first, with the size left on it
  pieces: dict[str, list[AxisSpec]] = {name: [] for name in PLACEMENT_ORDER}
  cursor = 0
  for name in PLACEMENT_ORDER:
    need = sizes[name]
    while need > 1:
      axis, left = free[cursor]
      if left == 1:
        cursor += 1
        continue
      take = math.gcd(need, left)
      if take == 1 or (take < need and take < left):
        raise Infeasible("placement", f"{name}={sizes[name]} cannot tile axis {axis.name!r} ({left} of {axis.size} "
                         "devices left) evenly")
      pieces[name].append(dataclasses.replace(axis, size=take))
      free[cursor][1] = left // take
      need //= take
  groups = {name: _subgrid(topology, name, pieces[name]) for name in ("tp", "cp", "pp")}
  tp_in_ep, groups["etp"] = split(groups["tp"], etp)
  groups["ep"] = _subgrid(topology, "ep", list(tp_in_ep.axes) + pieces["ep_dp"])
  groups["data"] = _subgrid(topology, "data", pieces["ep_dp"] + pieces["cp"] + pieces["dp_rest"])
  groups["expert_data"] = _subgrid(topology, "expert_data", pieces["cp"] + pieces["dp_rest"])
  return Placement(groups)


def split(group: Topology, inner_size: int) -> tuple[Topology, Topology]:
  """Splits a group into (outer replicas, inner shards): the innermost `inner_size` devices form a shard group
  (e.g. ZeRO's inside the data-parallel group) and the outer devices join the shards' replicas."""
  if inner_size < 1 or group.num_devices % inner_size:
    raise ValueError(f"inner_size {inner_size} must divide the {group.num_devices} devices of {group.name}")
  inner, outer, need = [], [], inner_size
  for axis in reversed(group.axes):
    take = math.gcd(need, axis.size)
    if take < need and take < axis.size:
      raise ValueError(f"inner_size {inner_size} does not tile the axes of {group.name}")
    inner.append(dataclasses.replace(axis, size=take))
    outer.append(dataclasses.replace(axis, size=axis.size // take))
    need //= take
  return (_subgrid(group, "replicas", [axis for axis in outer if axis.size > 1]),
          _subgrid(group, "shards", [axis for axis in inner if axis.size > 1]))
