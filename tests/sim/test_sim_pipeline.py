"""Pipeline bubble formulas, in-flight micro-batches and the layer split over stages."""

import pytest

from pangu.sim import Infeasible, pipeline


def test_one_integer_n_reproduces_pangu_ultras_bubbles():
  # Pangu Ultra §4.1: p = 8 stages, v = 6 virtual stages cut the bubble from 30.45% to 6.8%.
  matches = [n for n in range(1, 257)
             if abs(pipeline.bubble_fraction(8, n) - 0.3045) < 5e-4
             and abs(pipeline.bubble_fraction(8, n, 6) - 0.068) < 5e-4]
  assert matches == [16]
  assert pipeline.bubble_fraction(8, 16) == pytest.approx(7 / 23)
  assert pipeline.bubble_fraction(8, 16, 6) == pytest.approx(7 / 103)


def test_schedule_time_matches_the_bubble():
  stage = 0.1
  for p, n, v in ((8, 16, 1), (8, 16, 6), (4, 3, 2)):
    total = pipeline.schedule_seconds(stage, p, n, v)
    assert 1 - n * stage / total == pytest.approx(pipeline.bubble_fraction(p, n, v))


def test_micro_batches_in_flight():
  assert pipeline.micro_batches_in_flight(8, 32) == 8  # 1F1B: p on the first stage
  assert pipeline.micro_batches_in_flight(8, 32, stage=7) == 1
  assert pipeline.micro_batches_in_flight(8, 4) == 4  # fewer micro-batches than stages
  # Interleaved: p + (p - 1) / v stage-micro-batches (Korthikanti et al. 2022).
  assert pipeline.micro_batches_in_flight(8, 32, 2) == pytest.approx(8 + 7 / 2)


def test_no_op_padding_and_stage_split():
  # Pangu Pro MoE: 48 layers + 2 no-op layers over PP5 x VPP5.
  assert pipeline.padded_layers(48, 5, 5, max_noop=2) == 50
  with pytest.raises(Infeasible, match="needs 2 no-op layers"):
    pipeline.padded_layers(48, 5, 5, max_noop=1)
  stages = pipeline.stage_layers(["dense"] * 3 + ["moe"] * 59, 16, 4)
  assert [len(s) for s in stages] == [3] + [4] * 14 + [3]  # the two no-ops go to the last and first stage
  assert stages[0] == ["dense"] * 3 and stages[1] == ["moe"] * 4
