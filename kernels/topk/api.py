"""The indices of the k largest entries along the last axis (lax.top_k's second output), with an AVX2 FFI
kernel for XLA:CPU (top_k.cc): XLA:CPU's top-k is the slowest op of a SpeCache decode step's prefetch choice."""

import os

import jax
import jax.numpy as jnp

from pangu_kernels import ffi

IMPLEMENTATIONS = ("cpu", "xla")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "top_k.cc")
TARGET = "pangu_top_k"


def kernel_registered() -> bool:
  """Whether top_k.cc is built and registered here (compiled once per process; False: see the log)."""
  return ffi.register(SOURCE, ((TARGET, "TopK"),))


def cpu_supported(x: jax.Array) -> bool:
  """Whether the kernel runs on x: float32 on the CPU backend without a device mesh, where it builds."""
  return (x.dtype == jnp.float32 and jax.default_backend() == "cpu"
          and jax.sharding.get_abstract_mesh().size <= 1 and kernel_registered())


def top_k_indices(x: jax.Array, k: int, *, implementation: str | None = None) -> jax.Array:
  """x [..., X] (no NaN) -> int32 [..., k]: the indices of the k largest entries, largest first (the kernel
  keeps equal values in index order; lax.top_k may order tied -infs otherwise).

  implementation: `cpu` (the kernel), `xla` (lax.top_k), or None (`cpu` where `cpu_supported`).
  """
  if implementation is None:
    implementation = "cpu" if cpu_supported(x) else "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  if not 1 <= k <= x.shape[-1]:
    raise ValueError(f"top_k_indices: k={k} must be in [1, {x.shape[-1]}] (the last axis of x {x.shape})")
  if implementation == "xla":
    return jax.lax.top_k(x, k)[1].astype(jnp.int32)
  if not cpu_supported(x):
    raise ValueError(f"top_k_indices: the cpu kernel takes float32 on the CPU backend where it builds, got "
                     f"{x.dtype} on {jax.default_backend()}")
  rows = x.reshape(-1, x.shape[-1])
  out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows.shape[0], k), jnp.int32))(rows)
  return out.reshape(*x.shape[:-1], k)
