"""Field checks for the frozen config dataclasses: errors name the class, the field and the bad value."""

from collections.abc import Collection


def positive_ints(obj, *names: str) -> None:
  """Each named field of `obj` is an int >= 1 (bools rejected)."""
  for name in names:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


def positive_numbers(obj, *names: str) -> None:
  """Each named field of `obj` is a number > 0 (NaN rejected)."""
  for name in names:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
      raise ValueError(f"{type(obj).__name__}.{name} must be > 0, got {value!r}")


def one_of(obj, name: str, allowed: Collection) -> None:
  """The field `name` of `obj` is one of `allowed`."""
  value = getattr(obj, name)
  if value not in allowed:
    raise ValueError(f"{type(obj).__name__}.{name} must be one of {tuple(allowed)}, got {value!r}")
