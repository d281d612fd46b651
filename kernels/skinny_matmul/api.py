"""x [..., K] times an [out, in] kernel w [N, K] for few rows: the FFI kernel on CPU where it runs, else XLA.

Why a kernel: a decode step multiplies B = 1..8 rows by every weight, and XLA:CPU's library GEMMs (YNNPACK,
Eigen) pack the weight on every call, which costs more than the multiply-adds. skinny_matmul.cc streams each
weight row once instead. Measured on a 2-core AMD EPYC (Zen 3), one thread, weights cycled through ~70 MB (twice
the L3) so they come from memory as in a decode step, median CPU time per matmul (interleaved runs):
  rows  weight [N, K]   kernel   XLA [out, in]   XLA [in, out]
     8  1408 x 512      0.69 ms   1.21 ms         1.14 ms
     8   512 x 1408     0.52 ms   0.77 ms         1.54 ms
     8  8192 x 512      3.96 ms   5.89 ms         8.45 ms
    64  1408 x 512      2.15 ms   2.21 ms         2.20 ms
     1  1408 x 512      0.53 ms   0.42 ms         -
"""

import math

import jax
import jax.numpy as jnp

from pangu_kernels.skinny_matmul import build, reference

IMPLEMENTATIONS = ("cpu", "xla")
# Rows where the kernel beats XLA on CPU: one row is a matrix-vector product, which XLA streams as fast, and
# from about 64 rows (prefill) XLA's packed GEMM pays for its packing.
MIN_ROWS, MAX_ROWS = 4, 32


def cpu_kernel_supported(x: jax.Array, w: jax.Array) -> bool:
  """Whether `skinny_matmul` picks the kernel: float32 on the CPU backend, MIN_ROWS..MAX_ROWS rows, no device
  mesh (XLA cannot split a custom call over devices), and the kernel built here."""
  rows = math.prod(x.shape[:-1])
  return (x.dtype == w.dtype == jnp.float32 and jax.default_backend() == "cpu" and MIN_ROWS <= rows <= MAX_ROWS
          and jax.sharding.get_abstract_mesh().size <= 1 and build.register())


def skinny_matmul(x: jax.Array, w: jax.Array, *, implementation: str | None = None,
                  preferred_element_type: jnp.dtype | None = None) -> jax.Array:
  """x [..., K], w [N, K] -> [..., N].

  implementation: `cpu` (the FFI kernel, float32 only, forward only), `xla` (the reference einsum) or None:
  the kernel where `cpu_kernel_supported`, else the reference.
  """
  if x.shape[-1] != w.shape[-1] or w.ndim != 2:
    raise ValueError(f"skinny_matmul: x {x.shape} and w {w.shape} must be [..., K] and [N, K]")
  if implementation is None:
    implementation = "cpu" if cpu_kernel_supported(x, w) else "xla"
  if implementation == "xla":
    return reference.skinny_matmul(x, w, preferred_element_type)
  if implementation != "cpu":
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  if not (x.dtype == w.dtype == jnp.float32):
    raise ValueError(f"the cpu implementation takes float32, got x {x.dtype} and w {w.dtype}")
  if not build.register():
    raise RuntimeError("the skinny_matmul kernel is unavailable here (see the log); use implementation='xla'")
  rows = x.reshape(-1, x.shape[-1])
  out = jax.ffi.ffi_call(build.TARGET, jax.ShapeDtypeStruct((rows.shape[0], w.shape[0]), jnp.float32))(rows, w)
  return out.reshape(*x.shape[:-1], w.shape[0])
