"""Readings of a reported layout: every combination simulated, monotone where the model says it must be, and the
assumption that moves the MFU most named from the numbers."""

import pytest

from pangu.parallel.topology import pod
from pangu.sim import Plan, TrainWorkload, get_shape, readings


@pytest.fixture(scope="module")
def setup():
  # Pro MoE 72B on 256 800T A2 NPUs: a MoE shape with real EP traffic, small enough to simulate in milliseconds.
  shape, topology = get_shape("pro-moe-72b"), pod("atlas-800t-a2", 256)
  plan = Plan(tp=8, pp=4, vpp=2, ep=2, dp=8, micro_batch=1, recompute="full")
  assumptions = (readings.assumption("global batch", small={"global_batch": 32}, large={"global_batch": 128}),
                 readings.assumption("EP overlap", exposed={"ep_overlap": False}, hidden={"ep_overlap": True}),
                 readings.assumption("recompute", full={"recompute": "full"}, none={"recompute": "none"}))
  rows = readings.readings(shape, plan, TrainWorkload(4096, 32), topology, assumptions)
  return rows, assumptions


def _mfu(rows, **labels):
  (row,) = [r for r in rows if all(r["readings"][k.replace("_", " ")] == v for k, v in labels.items())]
  return row


def test_every_combination_is_simulated(setup):
  rows, assumptions = setup
  assert len(rows) == 8 and all(row["mfu"] > 0 for row in rows)
  assert {row["global_batch"] for row in rows} == {32, 128}
  assert {row["micro_batches"] for row in rows} == {4, 16}  # global batch / (dp 8 x micro-batch 1)


def test_readings_are_monotone_where_the_model_says_so(setup):
  rows, _ = setup
  for overlap in ("exposed", "hidden"):
    for recompute in ("full", "none"):
      small = _mfu(rows, global_batch="small", EP_overlap=overlap, recompute=recompute)
      large = _mfu(rows, global_batch="large", EP_overlap=overlap, recompute=recompute)
      assert large["mfu"] > small["mfu"] and large["bubble"] < small["bubble"]  # more micro-batches, less bubble
  for batch in ("small", "large"):
    for recompute in ("full", "none"):
      exposed = _mfu(rows, global_batch=batch, EP_overlap="exposed", recompute=recompute)
      hidden = _mfu(rows, global_batch=batch, EP_overlap="hidden", recompute=recompute)
      assert hidden["mfu"] >= exposed["mfu"]
    for overlap in ("exposed", "hidden"):
      full = _mfu(rows, global_batch=batch, EP_overlap=overlap, recompute="full")
      none = _mfu(rows, global_batch=batch, EP_overlap=overlap, recompute="none")
      assert none["mfu"] > full["mfu"] and none["memory_gib"] > full["memory_gib"]


def test_effects_name_the_assumption_with_the_largest_spread(setup):
  rows, assumptions = setup
  result = readings.effects(rows, assumptions)
  spreads = {}
  for name, labels in (("global batch", ("small", "large")), ("EP overlap", ("exposed", "hidden")),
                       ("recompute", ("full", "none"))):
    medians = [sorted(r["mfu"] for r in rows if r["readings"][name] == label) for label in labels]
    expected = [(m[1] + m[2]) / 2 for m in medians]  # the median of four values
    assert result["by_assumption"][name]["median_mfu"] == pytest.approx(dict(zip(labels, expected)))
    spreads[name] = max(expected) - min(expected)
  assert result["driver"] == max(spreads, key=spreads.get)


def test_memory_overflow_keeps_the_mfu_and_says_why():
  shape, topology = get_shape("pro-moe-72b"), pod("atlas-800t-a2", 64)
  row = readings.reading(shape, Plan(tp=1, pp=1, ep=8, dp=64, micro_batch=4), TrainWorkload(4096, 256), topology)
  assert row["fits"] is False and "GiB" in row["reason"] and row["mfu"] > 0 and row["memory_gib"] > 64


def test_assumptions_reject_unknown_fields_and_single_readings():
  with pytest.raises(ValueError, match="unknown fields"):
    readings.assumption("x", a={"tp": 2}, b={"no_such_field": 1})
  with pytest.raises(ValueError, match="at least two readings"):
    readings.assumption("x", a={"tp": 2})
