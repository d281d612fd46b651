"""The stored CPU calibration, the mapping of measured configs onto simulator plans, and the comparison metrics."""

import pytest

from pangu.sim import calibrate, validation


def test_stored_calibration_is_a_two_axis_cpu8_topology():
  calibration = calibrate.load()
  assert calibration.topology.num_devices == 8
  assert calibration.topology.axis_names == ("node", "npu")
  assert calibration.options.fused_attention is False
  assert {family for family, _ in calibration.options.op_costs} == {"dense", "attention", "experts"}
  assert calibration.topology.device.peak_flops("float32") > 1e8


def test_cases_map_onto_plans_over_the_batch_axes():
  assert len(validation.CASES) >= 12 and len({case.name for case in validation.CASES}) == len(validation.CASES)
  for case in validation.CASES:
    shape, plan, workload = case.to_sim()
    sizes = case.parallel_plan().axis_sizes
    assert plan.num_devices == 8 and plan.tp == sizes["tensor"] and plan.ep == sizes["expert"]
    assert plan.dp * plan.micro_batch == workload.global_batch == case.batch
    assert shape.param_count() > 0


def test_compare_reports_spearman_and_mape():
  calibration = calibrate.load()
  cases = validation.CASES[:4]
  predicted = {case.name: validation.predict(case, calibration) for case in cases}
  exact = validation.compare({name: [t] * 3 for name, t in predicted.items()}, calibration, cases)
  assert exact["spearman"] == pytest.approx(1.0) and exact["mape"] == pytest.approx(0.0, abs=1e-12)
  doubled = validation.compare({name: [2 * t] for name, t in predicted.items()}, calibration, cases)
  assert doubled["spearman"] == pytest.approx(1.0) and doubled["mape"] == pytest.approx(0.5)
  assert doubled["n_configs"] == 4


def test_stored_measurements_cover_every_case():
  times = validation.load_measurements()
  assert {case.name for case in validation.CASES} <= set(times)
