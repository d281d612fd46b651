"""The stored CPU calibration, the mapping of measured configs onto simulator plans, and the comparison metrics."""

import pytest

from pangu.sim import calibrate, operators, validation


def test_stored_calibration_is_a_two_axis_cpu8_topology():
  calibration = calibrate.load()
  assert calibration.topology.num_devices == 8
  assert calibration.topology.axis_names == ("node", "npu")
  assert calibration.options.fused_attention is False
  assert {family for family, _ in calibration.options.op_costs} == set(operators.FAMILIES)
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
  assert exact["median_relative_iqr"] == 0.0 and exact["round_spearman"] == pytest.approx([1.0] * 3)


def test_compare_reports_the_spread_of_rounds():
  calibration = calibrate.load()
  cases = validation.CASES[:3]
  predicted = {case.name: validation.predict(case, calibration) for case in cases}
  # Rounds t, 2t, 3t: the 25th and 75th percentiles are 1.5t and 2.5t, the median 2t, so the relative IQR is 1/2.
  steady = validation.compare({name: [t, 2 * t, 3 * t] for name, t in predicted.items()}, calibration, cases)
  assert steady["median_relative_iqr"] == pytest.approx(0.5)
  assert steady["round_spearman"] == pytest.approx([1.0, 1.0, 1.0])
  # A second round that ranks the configs in reverse (1 / t) correlates -1 on its own.
  flipped = validation.compare({name: [t, 1.0 / t] for name, t in predicted.items()}, calibration, cases)
  assert flipped["round_spearman"] == pytest.approx([1.0, -1.0])


def test_stored_measurements_cover_every_case():
  times = validation.load_measurements()
  assert {case.name for case in validation.CASES} <= set(times)


def test_case_rejects_meshes_and_batches_that_do_not_fit_the_cpu_mesh():
  with pytest.raises(ValueError, match="ValidationCase.mesh"):
    validation.ValidationCase("bad", 128, 2, (("data", 4),))
  with pytest.raises(ValueError, match="ValidationCase.batch=12"):
    validation.ValidationCase("bad", 128, 2, (("data", 8),), batch=12)


def test_cases_span_width_depth_experts_and_every_parallel_axis():
  configs = [case.model_config() for case in validation.CASES]
  assert max(c.d_model for c in configs) >= 4 * min(c.d_model for c in configs)
  assert max(c.n_layers for c in configs) >= 4 * min(c.n_layers for c in configs)
  assert {c.moe.num_experts for c in configs if c.moe} >= {8, 16, 32}
  for axis in validation.MESH_AXES:
    assert {dict(case.mesh).get(axis, 1) for case in validation.CASES} >= {1, 4}, axis


def test_cross_run_scores_each_calibration_on_the_other_runs_steps():
  calibration = calibrate.load()
  cases = validation.CASES[:4]
  predicted = {case.name: validation.predict(case, calibration) for case in cases}
  this_run = {name: [t, t] for name, t in predicted.items()}
  other_run = {name: [2 * t, 2 * t] for name, t in predicted.items()}
  cross = validation.cross_run(calibration, this_run, calibration, other_run, cases)
  # This calibration predicts t against the other run's 2t: |t / 2t - 1| = 0.5; the reverse is exact.
  assert cross["mape"] == pytest.approx(0.5) and cross["reverse"]["mape"] == pytest.approx(0.0, abs=1e-12)
  assert cross["worst_mape"] == pytest.approx(0.5) and cross["step_drift"] == pytest.approx(1.0)
  assert cross["spearman"] == pytest.approx(1.0) and cross["n_configs"] == 4
  assert cross["prediction_drift"] == 0.0  # the same calibration twice predicts the same steps



def test_stored_other_run_covers_every_case():
  times = validation.load_measurements(validation.OTHER_STEPS_PATH)
  assert {case.name for case in validation.CASES} <= set(times)
  assert calibrate.load(validation.OTHER_CALIBRATION_PATH).topology.num_devices == 8
