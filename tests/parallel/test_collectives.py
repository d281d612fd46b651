"""α–β collective costs against hand-computed values (ascend_topology.md §3)."""

import pytest

from pangu.parallel import collectives
from pangu.parallel import topology

GB = 1e9
HCCS = 196e9 * 0.7  # effective B/s
ROCE = 25e9 * 0.7
STATIC = 10e-6


def test_all_reduce_one_gb_over_8_hccs_devices():
  expected = 2 * 0.5e-6 + 2 * (7 / 8) * GB / HCCS + STATIC
  assert collectives.all_reduce(topology.atlas_800t_a2(), "npu", GB) == pytest.approx(expected)


def test_all_gather_over_roce_pays_a_step_per_peer():
  topo = topology.atlas_800t_a2(num_nodes=4)
  expected = 3 * 1.5e-6 + (3 / 4) * GB / ROCE + STATIC  # CLOS: n - 1 = 3 steps
  assert collectives.all_gather(topo, "node", GB) == pytest.approx(expected)
  assert collectives.reduce_scatter(topo, "node", GB) == pytest.approx(expected)
  assert collectives.all_to_all(topo, "node", GB) == pytest.approx(expected)


def test_all_reduce_over_pcie_cards():
  expected = 2 * 3 * 0.2e-6 + 2 * (3 / 4) * GB / (64e9 * 0.7) + STATIC
  assert collectives.all_reduce(topology.atlas_300i_duo(), "card", GB) == pytest.approx(expected)


def test_hierarchical_all_reduce_is_rs_npu_ar_node_ag_npu():
  topo = topology.atlas_800t_a2(num_nodes=2)
  rs_npu = 0.5e-6 + (7 / 8) * GB / HCCS
  ar_node = 2 * 1.5e-6 + 2 * (1 / 2) * (GB / 8) / ROCE
  ag_npu = rs_npu
  expected = rs_npu + ar_node + ag_npu + STATIC
  assert collectives.all_reduce(topo, ("node", "npu"), GB) == pytest.approx(expected)
  assert collectives.all_reduce(topo, ["npu", "node"], GB) == pytest.approx(expected)  # order-free


def test_hierarchical_all_gather_moves_n_minus_1_over_n_of_the_buffer():
  # node and chip links of CloudMatrix384 share 196e9 B/s, so the bandwidth term sums to (N - 1)/N · V / B.
  topo = topology.cloudmatrix384()
  latency = 47 * 5.5e-6 + 7 * 0.5e-6
  expected = latency + (383 / 384) * GB / HCCS + STATIC
  assert collectives.all_gather(topo, ("node", "chip"), GB) == pytest.approx(expected)


def test_flat_all_to_all_splits_traffic_by_outermost_differing_axis():
  topo = topology.atlas_800t_a2(num_nodes=2)
  node_share = 1 / 2  # half of the receivers sit on the other node
  npu_share = (7 / 8) / 2  # 7 of the 16 receivers are other NPUs on this node
  expected = 1.5e-6 + node_share * GB / ROCE + 0.5e-6 + npu_share * GB / HCCS + STATIC
  assert collectives.all_to_all(topo, ("node", "npu"), GB) == pytest.approx(expected)


def test_single_device_group_is_free():
  assert collectives.all_reduce(topology.atlas_800t_a2(num_nodes=1), "node", GB) == 0.0


def test_hierarchical_ep_all_to_all_by_hand():
  topo = topology.atlas_800t_a2(num_nodes=4)
  tokens, top_k = 1e6, 8
  gather = 3 * 1.5e-6 + (3 / 4) * (4 * tokens) / ROCE + STATIC
  exchange = 0.5e-6 + (7 / 8) * (top_k * tokens) / HCCS + STATIC
  assert collectives.hierarchical_ep_all_to_all(topo, tokens, top_k) == pytest.approx(gather + exchange)


def test_hierarchical_ep_beats_flat_only_when_the_node_link_is_slow():
  tokens, top_k = 1e6, 8
  a2 = topology.atlas_800t_a2(num_nodes=4)  # RoCE is 8x slower than HCCS
  assert (collectives.hierarchical_ep_all_to_all(a2, tokens, top_k)
          < collectives.all_to_all(a2, ("node", "npu"), top_k * tokens))
  cm = topology.cloudmatrix384()  # UB crosses nodes at full speed: gathering to 48 nodes costs more
  assert (collectives.hierarchical_ep_all_to_all(cm, tokens, top_k)
          > collectives.all_to_all(cm, ("node", "chip", "die"), top_k * tokens))


def test_argument_errors():
  topo = topology.atlas_800t_a2(num_nodes=2)
  with pytest.raises(ValueError, match="has no axis 'tensor'"):
    collectives.all_gather(topo, "tensor", GB)
  with pytest.raises(ValueError, match="axes must be distinct"):
    collectives.all_gather(topo, ("npu", "npu"), GB)
  with pytest.raises(ValueError, match="nbytes must be >= 0, got -1"):
    collectives.all_reduce(topo, "npu", -1)
  with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
    collectives.hierarchical_ep_all_to_all(topo, GB, 0)
  with pytest.raises(ValueError, match="must not share an axis"):
    collectives.hierarchical_ep_all_to_all(topo, GB, 8, outer="node", inner=("node", "npu"))
