"""Ascend hardware as data: device specs, interconnect axes and named cluster presets.

The model copies msmodeling's `DeviceProfile` / `CommGrid` (Ascend/msmodeling, `tensor_cast/device.py`): a device
has peak matrix and vector FLOP/s, memory size and bandwidth, efficiency factors and static per-op costs; a cluster
is an N-D grid of devices, outer -> inner, where every grid axis has its own link. The cost model in
`pangu.parallel.collectives` and the simulator read these records; `pangu.parallel.mesh` reads the node boundary.

Units: bytes and seconds throughout. Memory sizes follow msmodeling's binary units (64 GiB, 1.6 TiB/s); link
bandwidths are decimal and unidirectional per device (25e9 B/s is RoCE's 200 Gbps).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

GiB = 1024**3
TiB = 1024**4

FABRICS = ("HCCS", "RoCE", "UB", "SIO", "PCIe", "shared-memory")


def _dtype_name(dtype: DTypeLike) -> str:
  """Canonical numpy name ("bfloat16", "float16", ...) so that strings and dtype objects compare equal."""
  try:
    return jnp.dtype(dtype).name
  except TypeError as error:
    raise ValueError(f"dtype={dtype!r} is not a dtype name JAX understands") from error


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceSpec:
  """One accelerator as the cost model sees it.

  Attributes:
    name: marketing or bin name, e.g. "Ascend 910B (376T bin)".
    matrix_flops: peak matrix-unit FLOP/s (OP/s for integers) per dtype name, as `(dtype, rate)` pairs so the
      record stays hashable. Its keys are the dtypes the device can compute in.
    vector_flops: peak vector-unit FLOP/s at 16-bit precision (bf16 where the device has it).
    hbm_bytes: device memory in bytes.
    hbm_bandwidth: device memory bandwidth in B/s.
    compute_efficiency: fraction of peak FLOP/s a well-shaped kernel reaches (msmodeling's modelling choice).
    memory_efficiency: fraction of peak memory bandwidth a streaming kernel reaches (msmodeling's choice).
    matmul_static_cost: fixed seconds per matrix op (launch and scheduling).
    vector_static_cost: fixed seconds per vector op.
    collective_static_cost: fixed seconds per collective op.
  """

  name: str
  matrix_flops: tuple[tuple[str, float], ...]
  vector_flops: float
  hbm_bytes: int
  hbm_bandwidth: float
  compute_efficiency: float = 0.7
  memory_efficiency: float = 0.6
  matmul_static_cost: float = 5e-6
  vector_static_cost: float = 2e-6
  collective_static_cost: float = 10e-6

  def __post_init__(self):
    if not self.name:
      raise ValueError(f"DeviceSpec.name must be non-empty, got {self.name!r}")
    if not self.matrix_flops:
      raise ValueError(f"DeviceSpec.matrix_flops must list at least one dtype, got {self.matrix_flops!r}")
    names = [dtype for dtype, _ in self.matrix_flops]
    for dtype, rate in self.matrix_flops:
      if _dtype_name(dtype) != dtype:
        raise ValueError(f"DeviceSpec.matrix_flops key {dtype!r} is not canonical; use {_dtype_name(dtype)!r}")
      if rate <= 0:
        raise ValueError(f"DeviceSpec.matrix_flops[{dtype!r}] must be positive, got {rate}")
    if len(set(names)) != len(names):
      raise ValueError(f"DeviceSpec.matrix_flops lists a dtype twice: {names}")
    for field in ("vector_flops", "hbm_bytes", "hbm_bandwidth"):
      if getattr(self, field) <= 0:
        raise ValueError(f"DeviceSpec.{field} must be positive, got {getattr(self, field)}")
    for field in ("compute_efficiency", "memory_efficiency"):
      if not 0 < getattr(self, field) <= 1:
        raise ValueError(f"DeviceSpec.{field} must be in (0, 1], got {getattr(self, field)}")
    for field in ("matmul_static_cost", "vector_static_cost", "collective_static_cost"):
      if getattr(self, field) < 0:
        raise ValueError(f"DeviceSpec.{field} must be >= 0 seconds, got {getattr(self, field)}")

  @property
  def supported_dtypes(self) -> tuple[str, ...]:
    return tuple(dtype for dtype, _ in self.matrix_flops)

  def peak_flops(self, dtype: DTypeLike) -> float:
    """Peak matrix FLOP/s in `dtype`; a ValueError for a dtype the device cannot compute in (bf16 on the 310P)."""
    name = _dtype_name(dtype)
    rates = dict(self.matrix_flops)
    if name not in rates:
      raise ValueError(f"{self.name} does not support {name}; supported dtypes: {', '.join(self.supported_dtypes)}")
    return rates[name]


class LinkKind(enum.Enum):
  """How devices on one axis are wired, which sets the number of latency steps a collective pays."""

  FULL_MESH = "full_mesh"  # every pair has a direct link: one step
  CLOS = "clos"  # switched fabric, modelled as a ring: n - 1 steps
  PCIE = "pcie"  # through the host's PCIe switch, modelled as a ring: n - 1 steps

  def steps(self, size: int) -> int:
    """Latency steps of one gather/scatter/exchange phase over `size` devices (msmodeling's rule)."""
    if size <= 1:
      return 0
    return 1 if self is LinkKind.FULL_MESH else size - 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class AxisSpec:
  """One axis of the device grid and the link that joins devices along it.

  Attributes:
    name: axis name, e.g. "node" or "npu".
    size: devices along the axis.
    bandwidth: unidirectional B/s per device on this link.
    latency: seconds per step.
    kind: wiring, which sets the step count.
    fabric: physical link, one of `FABRICS`.
    intra_node: whether the axis stays inside one server; the node boundary decides where tensor and expert
      parallelism may go.
    efficiency: fraction of `bandwidth` a collective reaches (msmodeling's modelling choice).
  """

  name: str
  size: int
  bandwidth: float
  latency: float
  kind: LinkKind
  fabric: str
  intra_node: bool
  efficiency: float = 0.7

  def __post_init__(self):
    if not self.name:
      raise ValueError(f"AxisSpec.name must be non-empty, got {self.name!r}")
    if self.size < 1:
      raise ValueError(f"AxisSpec.size must be >= 1, got {self.size} for axis {self.name!r}")
    if self.bandwidth <= 0:
      raise ValueError(f"AxisSpec.bandwidth must be positive, got {self.bandwidth} for axis {self.name!r}")
    if self.latency < 0:
      raise ValueError(f"AxisSpec.latency must be >= 0, got {self.latency} for axis {self.name!r}")
    if not isinstance(self.kind, LinkKind):
      raise ValueError(f"AxisSpec.kind must be a LinkKind, got {self.kind!r} for axis {self.name!r}")
    if self.fabric not in FABRICS:
      raise ValueError(f"AxisSpec.fabric must be one of {FABRICS}, got {self.fabric!r} for axis {self.name!r}")
    if not 0 < self.efficiency <= 1:
      raise ValueError(f"AxisSpec.efficiency must be in (0, 1], got {self.efficiency} for axis {self.name!r}")

  @property
  def effective_bandwidth(self) -> float:
    return self.bandwidth * self.efficiency


@dataclasses.dataclass(frozen=True)
class Topology:
  """A device grid: axes ordered outer (slowest) -> inner (fastest), all devices alike.

  Intra-node axes must be the innermost ones, so that a node is a contiguous block of device ids.
  """

  name: str
  axes: tuple[AxisSpec, ...]
  device: DeviceSpec

  def __post_init__(self):
    if not isinstance(self.axes, tuple) or not self.axes:
      raise ValueError(f"Topology.axes must be a non-empty tuple of AxisSpec, got {self.axes!r}")
    names = self.axis_names
    if len(set(names)) != len(names):
      raise ValueError(f"Topology.axes names must be unique, got {names}")
    flags = [axis.intra_node for axis in self.axes]
    if flags != sorted(flags):
      raise ValueError(f"Topology.axes must list inter-node axes before intra-node ones, got {names} "
                       f"with intra_node={flags}")

  @property
  def axis_names(self) -> tuple[str, ...]:
    return tuple(axis.name for axis in self.axes)

  def axis(self, name: str) -> AxisSpec:
    for axis in self.axes:
      if axis.name == name:
        return axis
    raise ValueError(f"{self.name} has no axis {name!r}; its axes are {self.axis_names}")

  @property
  def num_devices(self) -> int:
    return math.prod(axis.size for axis in self.axes)

  @property
  def chips_per_node(self) -> int:
    return math.prod(axis.size for axis in self.axes if axis.intra_node)

  @property
  def num_nodes(self) -> int:
    return self.num_devices // self.chips_per_node


# Ascend 910B, 376T bin: msmodeling `ATLAS_800_A2_376T_64G` (confirmed). The same die is msmodeling's
# `ATLAS_800_A3_752T_128G_DIE`, the device of the CloudMatrix384 preset.
_ASCEND_910_376T = DeviceSpec(
    name="Ascend 910B (376T bin)",
    matrix_flops=(("bfloat16", 353.9e12), ("float16", 376e12), ("float32", 99.5e12), ("int8", 752e12)),
    vector_flops=22e12,
    hbm_bytes=64 * GiB,
    hbm_bandwidth=1.6 * TiB,
)


def _a2_axes(num_nodes: int) -> tuple[AxisSpec, ...]:
  if num_nodes < 1:
    raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
  return (
      AxisSpec(name="node", size=num_nodes, bandwidth=25e9, latency=1.5e-6, kind=LinkKind.CLOS, fabric="RoCE",
               intra_node=False),
      AxisSpec(name="npu", size=8, bandwidth=196e9, latency=0.5e-6, kind=LinkKind.FULL_MESH, fabric="HCCS",
               intra_node=True),
  )


def atlas_800t_a2(num_nodes: int = 1) -> Topology:
  """Atlas 800T A2 training servers: `node` (RoCE) x `npu` = 8 (HCCS full mesh).

  Figures, all confirmed (Pangu Ultra §4.1; msmodeling `ATLAS_800_A2_376T_64G`, `A2_INTERCONNECT`):
  - device: 910B, 376T bin: BF16 353.9, FP16 376, FP32 99.5 TFLOPS, INT8 752 TOPS, vector 22 TFLOPS;
    64 GiB HBM at 1.6 TiB/s; efficiencies 0.7 compute / 0.6 memory; static costs 5 / 2 / 10 µs.
  - npu: HCCS 196e9 B/s per device (392 GB/s bidirectional), 0.5 µs, full mesh, efficiency 0.7.
  - node: RoCE 200 Gbps = 25e9 B/s per NPU, 1.5 µs, CLOS, efficiency 0.7.
  The bin is our choice among msmodeling's three (376T, 313T, 280T); Huawei's SKU names are unconfirmed.
  """
  return Topology("atlas-800t-a2", _a2_axes(num_nodes), _ASCEND_910_376T)


def atlas_800i_a2(num_nodes: int = 1) -> Topology:
  """Atlas 800I A2 inference servers: the 800T A2 hardware (Pro MoE §5.3 decodes on 4 of its NPUs).

  Figures as in `atlas_800t_a2` (confirmed). 64 GB per NPU follows the SGLang docs and msmodeling; Huawei's own
  sheet (32 vs 64 GB) is unconfirmed.
  """
  return Topology("atlas-800i-a2", _a2_axes(num_nodes), _ASCEND_910_376T)


def atlas_300i_duo(num_cards: int = 4) -> Topology:
  """One inference server of Atlas 300I Duo cards: `card` (<= 4) x `chip` = 2 (Ascend 310P3), PCIe only.

  Figures and status:
  - 2 chips per card, up to 4 cards per server, fp16 only (no bf16): confirmed (hiascend, vllm-ascend docs).
  - 48 GB per chip (96 GB LPDDR4X per card), 204e9 B/s per chip (408 GB/s per card): secondary.
  - INT8 140 TOPS per chip (280 per card): secondary. FP16 70 TFLOPS per chip: unconfirmed (half of INT8).
  - vector 4.1 TFLOPS: placeholder (ours), the 910B's vector/matrix ratio 22/376 applied to the FP16 rate.
  - chip-to-chip over PCIe, bandwidth unknown: placeholder 64e9 B/s, 0.2 µs (msmodeling's A2 PCIe profile).
  - efficiencies and static costs: msmodeling's A2 defaults, placeholders for this chip.
  """
  if not 1 <= num_cards <= 4:
    raise ValueError(f"num_cards must be in [1, 4] (cards per Atlas 800 inference server), got {num_cards}")
  device = DeviceSpec(
      name="Ascend 310P3",
      matrix_flops=(("float16", 70e12), ("int8", 140e12)),
      vector_flops=70e12 * 22 / 376,
      hbm_bytes=48 * 10**9,
      hbm_bandwidth=204e9,
  )
  pcie = dict(bandwidth=64e9, latency=0.2e-6, kind=LinkKind.PCIE, fabric="PCIe", intra_node=True)
  axes = (AxisSpec(name="card", size=num_cards, **pcie), AxisSpec(name="chip", size=2, **pcie))
  return Topology("atlas-300i-duo", axes, device)


def cloudmatrix384(num_nodes: int = 48) -> Topology:
  """CloudMatrix384 (Atlas 900 A3 SuperPoD) of 910C chips: `node` = 48 x `chip` = 8 x `die` = 2; device = one die.

  Figures, confirmed (msmodeling `A3_INTERCONNECT`, `ATLAS_800_A3_752T_128G_DIE`) unless marked:
  - device: one die, 64 GiB at 1.6 TiB/s, BF16 353.9, FP16 376 TFLOPS, INT8 752 TOPS.
  - node: UB tier 2, 196e9 B/s per die, 5.5 µs; chip: UB tier 1, 196e9 B/s, 0.5 µs; die: SIO 224e9 B/s,
    0.2 µs. All CLOS, efficiency 0.7.
  - 48 nodes of 8 chips and the non-blocking UB fabric: secondary (quoting the CloudMatrix paper).
  `num_nodes` < 48 models a slice of the supernode.
  """
  if not 1 <= num_nodes <= 48:
    raise ValueError(f"num_nodes must be in [1, 48] for CloudMatrix384, got {num_nodes}")
  axes = (
      AxisSpec(name="node", size=num_nodes, bandwidth=196e9, latency=5.5e-6, kind=LinkKind.CLOS, fabric="UB",
               intra_node=False),
      AxisSpec(name="chip", size=8, bandwidth=196e9, latency=0.5e-6, kind=LinkKind.CLOS, fabric="UB",
               intra_node=True),
      AxisSpec(name="die", size=2, bandwidth=224e9, latency=0.2e-6, kind=LinkKind.CLOS, fabric="SIO",
               intra_node=True),
  )
  return Topology("cloudmatrix384", axes, _ASCEND_910_376T)


def cpu(n: int | None = None,
        *,
        matmul_flops: float = 20e9,
        copy_bandwidth: float = 2e9,
        alpha: float = 50e-6,
        beta: float = 5e-10) -> Topology:
  """`n` fake CPU devices on one host (default: all local JAX devices), joined by shared memory.

  Every figure is a placeholder (ours) until the CPU calibration fits them:
  - matmul_flops: FLOP/s of one fake device with all of them busy, for every float dtype.
  - copy_bandwidth: memory-copy B/s of one fake device (the "HBM" bandwidth).
  - alpha: seconds per collective step; beta: seconds per byte (the link bandwidth is 1 / beta).
  The fitted alpha and beta already include all overheads, so efficiencies are 1 and static costs 0. The whole
  host is one node.
  """
  n = jax.device_count() if n is None else n
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  if beta <= 0:
    raise ValueError(f"beta must be positive seconds per byte, got {beta}")
  device = DeviceSpec(
      name="cpu",
      matrix_flops=(("bfloat16", matmul_flops), ("float16", matmul_flops), ("float32", matmul_flops)),
      vector_flops=matmul_flops,
      hbm_bytes=4 * GiB,
      hbm_bandwidth=copy_bandwidth,
      compute_efficiency=1.0,
      memory_efficiency=1.0,
      matmul_static_cost=0.0,
      vector_static_cost=0.0,
      collective_static_cost=0.0,
  )
  axis = AxisSpec(name="host", size=n, bandwidth=1 / beta, latency=alpha, kind=LinkKind.FULL_MESH,
                  fabric="shared-memory", intra_node=True, efficiency=1.0)
  return Topology("cpu", (axis,), device)


@dataclasses.dataclass(frozen=True)
class Preset:
  """How a named preset grows: `build(units)` for whole units of `devices_per_unit` devices, up to `max_units`."""

  build: Callable[..., Topology]
  unit: str
  devices_per_unit: int
  max_units: int | None = None

  def __post_init__(self):
    if self.devices_per_unit < 1:
      raise ValueError(f"Preset.devices_per_unit must be >= 1, got {self.devices_per_unit}")


PRESETS: Mapping[str, Preset] = types.MappingProxyType({
    "atlas-800t-a2": Preset(atlas_800t_a2, unit="node", devices_per_unit=8),
    "atlas-800i-a2": Preset(atlas_800i_a2, unit="node", devices_per_unit=8),
    "atlas-300i-duo": Preset(atlas_300i_duo, unit="card", devices_per_unit=2, max_units=4),
    "cloudmatrix384": Preset(cloudmatrix384, unit="node", devices_per_unit=16, max_units=48),
    "cpu": Preset(cpu, unit="device", devices_per_unit=1),
})


def _preset(name: str) -> Preset:
  if name not in PRESETS:
    raise ValueError(f"unknown topology preset {name!r}; known presets: {', '.join(PRESETS)}")
  return PRESETS[name]


def pod(preset_name: str, num_chips: int) -> Topology:
  """`num_chips` devices (dies on CloudMatrix384) built from whole units (nodes, cards) of a preset."""
  preset = _preset(preset_name)
  units, remainder = divmod(num_chips, preset.devices_per_unit)
  if num_chips < 1 or remainder:
    raise ValueError(f"num_chips={num_chips} is not a positive multiple of the {preset.devices_per_unit} devices "
                     f"per {preset.unit} of {preset_name}")
  if preset.max_units is not None and units > preset.max_units:
    raise ValueError(f"num_chips={num_chips} needs {units} {preset.unit}s but {preset_name} holds at most "
                     f"{preset.max_units} ({preset.max_units * preset.devices_per_unit} devices)")
  return preset.build(units)


def get_topology(name: str, num_chips: int | None = None) -> Topology:
  """A preset by name: its default size, or a pod of `num_chips` devices."""
  preset = _preset(name)
  return preset.build() if num_chips is None else pod(name, num_chips)
