"""Plan enumeration, training plan search and decode search under a TPOT limit."""

import dataclasses

import pytest

from pangu.parallel import topology
from pangu.sim import (DecodeWorkload, MoEShapeSpace, Plan, PlanSpace, TrainWorkload, best_decode, get_shape,
                       search_training, simulate_decode)

SMALL_SPACE = PlanSpace(tp=(2, 8), pp=(1, 4, 8), vpp=(1, 2), ep=(1,), cp=(1,), micro_batch=(1, 2),
                        recompute=("none", "full"))


def test_plans_factor_the_devices():
  plans = list(PlanSpace().plans(6144))
  assert plans
  for plan in plans[::97]:
    assert plan.num_devices == 6144 and plan.ep % plan.tp_in_ep == 0 and plan.dp % plan.ep_from_dp == 0
  assert all(plan.vpp == 1 for plan in plans if plan.pp == 1)


def test_training_search_ranks_feasible_plans_and_counts_rejections():
  result = search_training(get_shape("ultra-135b"), topology.pod("atlas-800t-a2", 512),
                           TrainWorkload(seq_len=4096, global_batch=512), SMALL_SPACE)
  assert result.ranked and result.evaluated == len(result.ranked) + sum(result.rejected.values())
  times = [estimate.step_seconds for estimate in result.ranked]
  assert times == sorted(times)
  assert result.rejected["memory"] > 0 and "GiB of 64.0 GiB" in result.examples["memory"]
  best = result.ranked[0]
  assert best.memory.total <= 64 * 2**30
  assert 0.2 < best.mfu < 0.7  # a dense 135B on HCCS + RoCE: a plausible band, not a target


def test_decode_search_respects_the_tpot_limit():
  pro = get_shape("pro-moe-72b")
  node = topology.atlas_800i_a2()
  four = topology.Topology("x4", (dataclasses.replace(node.axes[-1], size=4),), node.device)
  best = best_decode(pro, four, tpot_limit=0.05, context=2048)
  assert best is not None and best.tpot_seconds <= 0.05
  bigger = simulate_decode(pro, best.plan, DecodeWorkload(batch=best.batch + 8 * best.plan.dp, context=2048), four)
  assert bigger.tpot_seconds > 0.05 or bigger.memory.total > bigger.memory.capacity
  # Decode is memory-bound: the weights are a large share of a step (Pro MoE §5: 29% at its operating point).
  assert 0.15 < best.weight_seconds / best.tpot_seconds < 0.8


def test_moge_decode_is_never_slower_than_topk():
  moge = get_shape("pro-moe-72b")
  topk = moge.replace(moe=moge.moe.replace(router="topk", num_groups=1))
  node = topology.pod("atlas-800i-a2", 8)
  plan = Plan(tp=1, dp=8, ep=8)
  for batch in (8, 512):
    workload = DecodeWorkload(batch=batch, context=2048)
    moge_step, topk_step = (simulate_decode(shape, plan, workload, node) for shape in (moge, topk))
    assert moge_step.straggler == 1.0 and topk_step.straggler > 1.0
    assert moge_step.tpot_seconds < topk_step.tpot_seconds


def test_pro_moe_space_holds_the_published_shape():
  names = {shape.name: shape for shape in MoEShapeSpace().shapes()}
  published = names["d5120_h40_kv8_l48_e64_f1344"]
  assert published.param_count() == pytest.approx(get_shape("pro-moe-72b").param_count(), rel=1e-6)
  assert all(60e9 <= shape.param_count() <= 80e9 for shape in names.values())
