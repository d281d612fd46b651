"""α–β costs of collectives over the axes of a `Topology`, in seconds (ascend_topology.md §3; ours).

Notation: n = devices on an axis; V = bytes of the full buffer per device (for all-to-all, the bytes each device
sends, its own share included); B = bandwidth · efficiency; α = link latency; s = steps, 1 on FULL_MESH and n − 1
on CLOS and PCIe (`LinkKind.steps`). One phase over one axis costs s·α + (n − 1)/n · V / B:

- all-gather, reduce-scatter, all-to-all: one phase;
- all-reduce: two phases (reduce-scatter then all-gather).

Over several axes a collective decomposes hierarchically: the reduce-scatter goes inner -> outer, each axis
working on the shard the inner axes left, and the all-gather retraces it. Every collective call adds the
device's static collective cost once; a collective over a single device is free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pangu.parallel.topology import AxisSpec, Topology


def phase_time(axis: AxisSpec, nbytes: float) -> float:
  """One gather, scatter or exchange phase over `axis` for a V-byte buffer, without the static cost."""
  n = axis.size
  if n == 1:
    return 0.0
  return axis.kind.steps(n) * axis.latency + (n - 1) / n * nbytes / axis.effective_bandwidth


def _group(topology: Topology, axes: str | Sequence[str], nbytes: float) -> tuple[AxisSpec, ...]:
  """The named axes in topology order (outer -> inner)."""
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  if len(set(names)) != len(names):
    raise ValueError(f"axes must be distinct, got {names}")
  if nbytes < 0:
    raise ValueError(f"nbytes must be >= 0, got {nbytes}")
  for name in names:
    topology.axis(name)  # raises for an unknown name
  return tuple(axis for axis in topology.axes if axis.name in names)


def _hierarchical_phases(group: tuple[AxisSpec, ...], nbytes: float) -> float:
  """Phases of a hierarchical gather: each axis moves the shard that the axes inside it hold."""
  total = 0.0
  for index, axis in enumerate(group):
    inner_devices = math.prod(inner.size for inner in group[index + 1:])
    total += phase_time(axis, nbytes / inner_devices)
  return total


def _with_static(topology: Topology, group: tuple[AxisSpec, ...], link_time: float) -> float:
  if math.prod(axis.size for axis in group) == 1:
    return 0.0
  return topology.device.collective_static_cost + link_time


def all_gather(topology: Topology, axes: str | Sequence[str], nbytes: float) -> float:
  """All-gather over `axes` into a V-byte buffer per device: s·α + (n − 1)/n · V / B on one axis."""
  group = _group(topology, axes, nbytes)
  return _with_static(topology, group, _hierarchical_phases(group, nbytes))


def reduce_scatter(topology: Topology, axes: str | Sequence[str], nbytes: float) -> float:
  """Reduce-scatter over `axes` of a V-byte buffer per device: the all-gather's phases in reverse."""
  group = _group(topology, axes, nbytes)
  return _with_static(topology, group, _hierarchical_phases(group, nbytes))


def all_reduce(topology: Topology, axes: str | Sequence[str], nbytes: float) -> float:
  """All-reduce as reduce-scatter + all-gather: 2·s·α + 2·(n − 1)/n · V / B on one axis.

  Over (`node`, `npu`) this is reduce-scatter(`npu`, V) + all-reduce(`node`, V / n_npu) + all-gather(`npu`, V).
  """
  group = _group(topology, axes, nbytes)
  return _with_static(topology, group, 2 * _hierarchical_phases(group, nbytes))


def all_to_all(topology: Topology, axes: str | Sequence[str], nbytes: float) -> float:
  """Flat all-to-all over `axes`, each device sending V bytes spread evenly over the group.

  A byte crosses the outermost axis on which sender and receiver differ, so axis i (outer -> inner) carries the
  share (n_i − 1)/n_i / (n_1 ⋯ n_{i−1}) of V; the outermost axis carries (n_1 − 1)/n_1 · V, which dominates when
  its link is slow. The shares are charged one after another (an upper bound; ours).
  """
  group = _group(topology, axes, nbytes)
  link_time = 0.0
  outer_devices = 1
  for axis in group:
    n = axis.size
    if n > 1:
      share = (n - 1) / n / outer_devices
      link_time += axis.kind.steps(n) * axis.latency + share * nbytes / axis.effective_bandwidth
    outer_devices *= n
  return _with_static(topology, group, link_time)


def hierarchical_ep_all_to_all(topology: Topology,
                               token_bytes: float,
                               top_k: int,
                               *,
                               outer: str | Sequence[str] | None = None,
                               inner: str | Sequence[str] | None = None) -> float:
  """Pangu Ultra MoE's two-stage dispatch: all-gather tokens over `outer`, then all-to-all rows over `inner`.

  Every node receives all of the group's tokens once (n_outer · X bytes per device after the gather), instead of
  one copy per routed expert, then each row moves inside the node to its expert's device: with experts spread
  evenly a device sends top_k · X bytes there. Compare with the flat dispatch
  `all_to_all(topology, outer + inner, top_k * token_bytes)`; the two-stage one wins when the outer link is far
  slower and top_k > n_outer. The combine reverses both stages at the same cost. Two collective calls, so two
  static costs.

  Args:
    topology: the cluster.
    token_bytes: X, the bytes of the tokens one device dispatches (before top-k replication).
    top_k: experts per token.
    outer: axes of the gather stage; default the inter-node axes.
    inner: axes of the exchange stage; default the intra-node axes.

  Returns:
    Seconds for one dispatch.
  """
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  outer = tuple(a.name for a in topology.axes if not a.intra_node) if outer is None else outer
  inner = tuple(a.name for a in topology.axes if a.intra_node) if inner is None else inner
  outer_group = _group(topology, outer, token_bytes)
  inner_group = _group(topology, inner, token_bytes)
  if set(outer_group) & set(inner_group):
    raise ValueError(f"outer={outer} and inner={inner} must not share an axis")
  outer_devices = math.prod(axis.size for axis in outer_group)
  gather = all_gather(topology, [axis.name for axis in outer_group], outer_devices * token_bytes)
  exchange = all_to_all(topology, [axis.name for axis in inner_group], top_k * token_bytes)
  return gather + exchange
