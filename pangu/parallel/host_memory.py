"""Pinned host memory: where off-device arrays live, and, inside a compiled step, copies to and from it and
computation on the host.

These wrap `jax.experimental.compute_on`, whose API changed in jax 0.11 (a context manager before, a function
transform with explicit output memory spaces since), and the memory-space enum, which jax only exposes through
avals (`jax.typeof(x).memory_space`).
"""

import inspect
from collections.abc import Callable

import jax
from jax.experimental import compute_on as _compute_on


def _space(x: jax.Array, name: str):
  return getattr(type(jax.typeof(x).memory_space), name)


def to_host(tree):
  """Copies every array of `tree` to pinned host memory (inside jit)."""
  return jax.tree.map(lambda x: jax.device_put(x, _space(x, "Host")), tree)


def to_device(tree):
  """Copies every array of `tree` to device memory (inside jit)."""
  return jax.tree.map(lambda x: jax.device_put(x, _space(x, "Device")), tree)


def in_host_memory(x: jax.Array) -> bool:
  """Whether x (traced or concrete) lives in host memory, so computing on it needs `compute_on_host`."""
  return jax.typeof(x).memory_space == _space(x, "Host")


def has_pinned_host(device: jax.Device) -> bool:
  """Whether `device`'s backend exposes a pinned_host memory kind (jax memory kinds)."""
  return "pinned_host" in {m.kind for m in device.addressable_memories()}


def compute_on_host(fn: Callable, *args):
  """fn(*args) computed by the host, on operands in host memory; the outputs stay in host memory."""
  if "out_memory_spaces" in inspect.signature(_compute_on.compute_on).parameters:
    host = _space(jax.tree.leaves(args)[0], "Host")
    return _compute_on.compute_on(compute_type="device_host", out_memory_spaces=host)(fn)(*args)
  with _compute_on.compute_on("device_host"):
    return fn(*args)


def pinned_host_sharding(device: jax.Device, fallback: str) -> jax.sharding.SingleDeviceSharding:
  """Where to place arrays kept off `device`: its pinned host memory; a clear error (suggesting `fallback`)
  on backends without that memory kind."""
  if not has_pinned_host(device):
    kinds = {m.kind for m in device.addressable_memories()}
    raise ValueError(f"{device.platform} devices have no pinned_host memory (memory kinds {sorted(kinds)}); "
                     f"{fallback}")
  return jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
