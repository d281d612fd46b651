"""Presets against the figures in ascend_topology.md, unit consistency, and validation messages."""

import dataclasses

import jax.numpy as jnp
import pytest

from pangu.parallel import topology
from pangu.parallel.topology import AxisSpec, LinkKind, Topology


def test_roce_200_gbps_is_25e9_bytes_per_second():
  node = topology.atlas_800t_a2(num_nodes=2).axis("node")
  assert node.bandwidth == 200e9 / 8
  assert (node.fabric, node.kind, node.latency, node.intra_node) == ("RoCE", LinkKind.CLOS, 1.5e-6, False)


def test_hccs_is_seven_peers_of_28_gb_per_second():
  npu = topology.atlas_800t_a2().axis("npu")
  assert 7 * 28e9 == pytest.approx(npu.bandwidth)
  assert (npu.fabric, npu.kind, npu.latency, npu.size) == ("HCCS", LinkKind.FULL_MESH, 0.5e-6, 8)
  assert npu.effective_bandwidth == pytest.approx(196e9 * 0.7)


def test_cloudmatrix_chip_is_two_dies_of_196_gb_per_second():
  topo = topology.cloudmatrix384()
  assert topo.axis("die").size * topo.axis("chip").bandwidth == 392e9
  assert [(a.name, a.size, a.fabric, a.latency) for a in topo.axes] == [
      ("node", 48, "UB", 5.5e-6), ("chip", 8, "UB", 0.5e-6), ("die", 2, "SIO", 0.2e-6)]
  assert topo.axis("die").bandwidth == 224e9
  assert (topo.num_devices, topo.chips_per_node, topo.num_nodes) == (768, 16, 48)


def test_910b_376t_bin():
  device = topology.atlas_800t_a2().device
  assert device.peak_flops("bfloat16") == 353.9e12
  assert device.peak_flops(jnp.float16) == 376e12
  assert device.peak_flops(jnp.float32) == 99.5e12
  assert device.peak_flops("int8") == 752e12
  assert device.hbm_bytes == 64 * 1024**3
  assert device.hbm_bandwidth == 1.6 * 1024**4
  assert (device.compute_efficiency, device.memory_efficiency) == (0.7, 0.6)
  assert (device.matmul_static_cost, device.vector_static_cost, device.collective_static_cost) == (5e-6, 2e-6, 10e-6)
  assert topology.cloudmatrix384().device == device  # one A3 die is the same 376T profile


def test_a2_pod_shape():
  topo = topology.atlas_800t_a2(num_nodes=4)
  assert topo.axis_names == ("node", "npu")
  assert (topo.num_devices, topo.chips_per_node, topo.num_nodes) == (32, 8, 4)
  assert topology.atlas_800i_a2().axes == topology.atlas_800t_a2().axes


def test_300i_duo_refuses_bf16():
  device = topology.atlas_300i_duo().device
  with pytest.raises(ValueError, match="does not support bfloat16; supported dtypes: float16, int8"):
    device.peak_flops(jnp.bfloat16)
  assert device.peak_flops("float16") == 140e12 / 2  # half of a card's 140 TFLOPS
  assert device.hbm_bytes == 96e9 / 2 and device.hbm_bandwidth == 408e9 / 2


def test_300i_duo_server_is_one_node_of_pcie():
  topo = topology.atlas_300i_duo(num_cards=4)
  assert (topo.num_devices, topo.chips_per_node, topo.num_nodes) == (8, 8, 1)
  assert {(a.kind, a.fabric, a.bandwidth, a.latency) for a in topo.axes} == {(LinkKind.PCIE, "PCIe", 64e9, 0.2e-6)}
  with pytest.raises(ValueError, match="num_cards must be in"):
    topology.atlas_300i_duo(num_cards=5)


def test_cpu_topology_is_one_node_of_fitted_links(n_devices):
  topo = topology.cpu(alpha=1e-5, beta=1e-9)
  (host,) = topo.axes
  assert (host.size, host.latency, host.efficiency) == (n_devices, 1e-5, 1.0)
  assert host.bandwidth == pytest.approx(1 / 1e-9)
  assert (topo.chips_per_node, topo.num_nodes) == (n_devices, 1)
  assert topo.device.collective_static_cost == 0.0


@pytest.mark.parametrize("kind, size, steps", [
    (LinkKind.FULL_MESH, 8, 1),
    (LinkKind.CLOS, 8, 7),
    (LinkKind.PCIE, 4, 3),
    (LinkKind.CLOS, 1, 0),
])
def test_link_steps(kind, size, steps):
  assert kind.steps(size) == steps


def test_pod_and_registry(n_devices):
  assert topology.pod("atlas-800t-a2", 64).num_nodes == 8
  assert topology.pod("cloudmatrix384", 32).axis("node").size == 2
  assert topology.pod("atlas-300i-duo", 4).axis("card").size == 2
  assert topology.get_topology("atlas-800i-a2").name == "atlas-800i-a2"
  assert topology.get_topology("cloudmatrix384").num_devices == 768
  assert topology.get_topology("cpu").num_devices == n_devices
  assert topology.get_topology("atlas-800t-a2", num_chips=16).num_devices == 16


def test_pod_rejects_partial_nodes_and_oversize():
  with pytest.raises(ValueError, match="num_chips=12 is not a positive multiple of the 8 devices per node"):
    topology.pod("atlas-800t-a2", 12)
  with pytest.raises(ValueError, match="needs 49 nodes but cloudmatrix384 holds at most 48"):
    topology.pod("cloudmatrix384", 49 * 16)


def test_unknown_preset_lists_known_names():
  with pytest.raises(ValueError, match="unknown topology preset 'atlas-900'.*atlas-800t-a2.*cloudmatrix384.*cpu"):
    topology.get_topology("atlas-900")


def test_records_are_hashable_and_compare_by_value():
  assert topology.atlas_800t_a2(2) == topology.atlas_800t_a2(2)
  assert len({topology.atlas_800t_a2(2), topology.atlas_800t_a2(2), topology.atlas_800t_a2(1)}) == 2


_LINK = dict(bandwidth=1e9, latency=1e-6, kind=LinkKind.CLOS, fabric="RoCE", intra_node=False)


@pytest.mark.parametrize("change, message", [
    (dict(size=0), "AxisSpec.size must be >= 1, got 0"),
    (dict(bandwidth=-1.0), "AxisSpec.bandwidth must be positive, got -1.0"),
    (dict(efficiency=1.5), "AxisSpec.efficiency must be in \\(0, 1\\], got 1.5"),
    (dict(fabric="Infiniband"), "AxisSpec.fabric must be one of .*got 'Infiniband'"),
    (dict(kind="clos"), "AxisSpec.kind must be a LinkKind"),
])
def test_axis_validation(change, message):
  with pytest.raises(ValueError, match=message):
    AxisSpec(**{"name": "node", "size": 2, **_LINK, **change})


def test_device_validation():
  device = topology.atlas_800t_a2().device
  with pytest.raises(ValueError, match="key 'float' is not canonical; use 'float64'"):
    dataclasses.replace(device, matrix_flops=(("float", 1e12),))
  with pytest.raises(ValueError, match="dtype='bf16' is not a dtype name"):
    device.peak_flops("bf16")
  with pytest.raises(ValueError, match="DeviceSpec.memory_efficiency must be in \\(0, 1\\], got 0"):
    dataclasses.replace(device, memory_efficiency=0)
  with pytest.raises(ValueError, match="lists a dtype twice"):
    dataclasses.replace(device, matrix_flops=(("int8", 1e12), ("int8", 2e12)))


def test_topology_validation():
  device = topology.atlas_800t_a2().device
  outer = AxisSpec(name="node", size=2, **_LINK)
  inner = dataclasses.replace(outer, name="npu", intra_node=True)
  with pytest.raises(ValueError, match="inter-node axes before intra-node ones"):
    Topology("bad", (inner, outer), device)
  with pytest.raises(ValueError, match="names must be unique"):
    Topology("bad", (outer, outer), device)
  with pytest.raises(ValueError, match="has no axis 'tensor'"):
    Topology("ok", (outer, inner), device).axis("tensor")
