"""Group placement on the device grid and the per-layer collectives priced on it, against hand-computed values."""

import pytest

from pangu.parallel import collectives, topology
from pangu.sim import Infeasible, Plan, communication, operators, placement, ultra_moe_718b

HCCS = 196e9 * 0.7
ROCE = 25e9 * 0.7
STATIC = 10e-6
A2_6K = topology.pod("atlas-800t-a2", 6144)


def _sizes(group):
  return {axis.name: axis.size for axis in group.axes if axis.size > 1}


def test_tp_inside_the_node_ep_and_dp_across_nodes():
  plan = Plan(tp=8, pp=16, vpp=2, ep=4, dp=48, micro_batch=2)
  groups = placement.place(A2_6K, plan)
  assert _sizes(groups["tp"]) == {"npu": 8}
  assert _sizes(groups["ep"]) == {"node": 4}
  assert _sizes(groups["data"]) == {"node": 48}
  assert _sizes(groups["expert_data"]) == {"node": 12}
  assert _sizes(groups["pp"]) == {"node": 16}


def test_expert_tensor_parallelism_folds_tp_ranks_into_ep():
  # Megatron-core's ETP = 1 under TP = 8: the experts' EP group is the node's 8 NPUs x 4 nodes.
  plan = Plan(tp=8, pp=16, vpp=2, ep=32, expert_tp=1, dp=48, micro_batch=2)
  groups = placement.place(A2_6K, plan)
  assert _sizes(groups["etp"]) == {} and _sizes(groups["tp"]) == {"npu": 8}
  assert _sizes(groups["ep"]) == {"node": 4, "npu": 8}
  assert _sizes(groups["expert_data"]) == {"node": 12}
  # No TP all-gather / reduce-scatter of the routed rows is left: only the all-to-all of each rank's SP share.
  shape = ultra_moe_718b()
  sent = 8192 / 8 * 8 * 7680 * 2
  flat = communication.expert_exchange_seconds(groups["etp"], groups["ep"], plan, 8192, shape, 2)
  assert flat == pytest.approx(2 * collectives.all_to_all(groups["ep"], ("node", "npu"), sent))
  with pytest.raises(ValueError, match="expert_tp"):
    Plan(tp=8, ep=32, expert_tp=3, dp=48)


def test_a_group_larger_than_a_node_spans_both_axes():
  groups = placement.place(A2_6K, Plan(tp=2, ep=16, dp=384, pp=8))
  assert _sizes(groups["ep"]) == {"node": 4, "npu": 4}
  with pytest.raises(Infeasible, match="cannot tile"):
    placement.place(topology.pod("atlas-800t-a2", 24), Plan(tp=2, ep=3, dp=12))


def test_split_into_replicas_and_shards():
  group = placement.place(A2_6K, Plan(tp=2, ep=4, dp=3072))["data"]
  replicas, shards = placement.split(group, 16)
  assert _sizes(shards) == {"node": 4, "npu": 4}
  assert _sizes(replicas) == {"node": 192}


def test_flat_dispatch_is_one_all_to_all_each_way_over_roce():
  shape = ultra_moe_718b()
  plan = Plan(tp=8, pp=16, vpp=2, ep=4, dp=48, micro_batch=2)
  groups = placement.place(A2_6K, plan)
  tokens = 8192  # micro-batch 2 x 4096
  sent = tokens / 8 * 8 * 7680 * 2  # SP share of the tokens, K = 8 rows each, bf16
  all_to_all = 3 * 1.5e-6 + 3 / 4 * sent / ROCE + STATIC  # CLOS: n - 1 steps
  rows = tokens * 8 * 7680 * 2  # the TP group's rows, gathered and scattered over HCCS
  tensor = 2 * (0.5e-6 + 7 / 8 * rows / HCCS + STATIC)
  seconds = communication.expert_exchange_seconds(groups["etp"], groups["ep"], plan, tokens, shape, 2)
  assert seconds == pytest.approx(tensor + 2 * all_to_all)


def test_hierarchical_dispatch_beats_flat_when_top_k_exceeds_the_nodes():
  shape = ultra_moe_718b()
  flat = Plan(tp=8, pp=16, vpp=2, ep=4, dp=48, micro_batch=2)
  hierarchical = flat.replace(ep_dispatch="hierarchical")
  groups = placement.place(A2_6K, flat)
  times = [communication.expert_exchange_seconds(groups["etp"], groups["ep"], plan, 8192, shape, 2)
           for plan in (flat, hierarchical)]
  assert times[1] < times[0]
  # All-gather over the 4 nodes of each device's 1024 tokens, no intra-node exchange left (TP fills the node).
  gather = collectives.all_gather(groups["ep"], ("node",), 4 * 1024 * 7680 * 2)
  assert times[1] - times[0] == pytest.approx(2 * gather - 2 * (3 * 1.5e-6 + 3 / 4 * 1024 * 8 * 7680 * 2 / ROCE
                                                                  + STATIC))


def test_hierarchical_dispatch_inside_one_node_is_rejected():
  plan = Plan(tp=1, ep=8, dp=6144, ep_dispatch="hierarchical")
  groups = placement.place(A2_6K, plan)
  with pytest.raises(Infeasible, match="spans nodes"):
    communication.expert_exchange_seconds(groups["etp"], groups["ep"], plan, 4096, ultra_moe_718b(), 2)


def test_zero1_gradient_sync_is_reduce_scatter_plus_all_gather():
  plan = Plan(tp=8, pp=16, ep=1, dp=48)
  groups = placement.place(A2_6K, plan)
  grads, weights = 1e9 * 4, 1e9 * 2
  expected = (collectives.reduce_scatter(groups["data"], ("node",), grads)
              + collectives.all_gather(groups["data"], ("node",), weights))
  assert communication.data_parallel_seconds(groups, plan, 1e9, 0.0, 4, 2) == pytest.approx(expected)
  unsharded = plan.replace(zero_stage=0)
  assert communication.data_parallel_seconds(groups, unsharded, 1e9, 0.0, 4, 2) == pytest.approx(
      collectives.all_reduce(groups["data"], ("node",), grads))


def test_moge_dispatch_sends_one_row_per_device():
  from pangu.sim import get_shape
  pro = get_shape("pro-moe-72b")
  assert operators.dispatch_rows(pro, 8) == 8  # K' = 1 expert in each of the 8 groups, one group per device
  assert operators.dispatch_rows(pro, 2) == 2  # 4 groups per device: one row carries 4 experts
  assert operators.dispatch_rows(ultra_moe_718b(), 4) == 8  # top-K: one row per assignment
