"""The shared config field checks: errors name the class, the field and the bad value."""

import dataclasses
import math

import pytest

from pangu.config_checks import positive_numbers
from pangu.sim.operators import FamilyCost
from pangu.sim.training import ExchangeCost


@dataclasses.dataclass(frozen=True)
class _Scales:
  a: float = 1.0
  b: float = 0.5

  def __post_init__(self):
    positive_numbers(self, "a", "b")


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, True, "1"])
def test_positive_numbers_names_the_field_and_value(bad):
  with pytest.raises(ValueError, match=rf"_Scales\.b must be > 0, got {bad!r}".replace("(", r"\(")):
    _Scales(b=bad)


def test_positive_numbers_accept_ints_and_floats():
  assert _Scales(a=2, b=1e-9).a == 2


def test_simulator_costs_name_the_bad_scale():
  with pytest.raises(ValueError, match="ExchangeCost.backward_scale must be > 0, got 0.0"):
    ExchangeCost(backward_scale=0.0)
  with pytest.raises(ValueError, match="FamilyCost.forward_scale must be > 0, got -1.0"):
    FamilyCost(forward_scale=-1.0)
