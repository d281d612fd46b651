"""Attention's products over bit-packed low-bit K / V (SpeCache's and KIVI's cache), the kernel where it runs.

`lowbit_scores` (queries . keys) has a Pallas kernel (GPU / TPU, interpreted on CPU for tests) and an AVX2 FFI
kernel for XLA:CPU (lowbit.cc); `lowbit_weighted_values` (attention weights . values) has the FFI kernel. Both
read the codes in place; their XLA references dequantise the whole cache first.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from pangu_kernels import ffi
from pangu_kernels.specache import pallas, reference

IMPLEMENTATIONS = ("pallas", "pallas_interpret", "cpu", "xla")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lowbit.cc")
SCORES_TARGET, VALUES_TARGET = "pangu_lowbit_scores", "pangu_lowbit_weighted_values"


def cpu_kernel_registered() -> bool:
  """Whether lowbit.cc is built and registered here (compiled once per process; False: see the log)."""
  return ffi.register(SOURCE, ((SCORES_TARGET, "LowbitScores"), (VALUES_TARGET, "LowbitWeightedValues")))


def pallas_supported(tokens: int, group: int, block_tokens: int = pallas.DEFAULT_BLOCK_TOKENS) -> bool:
  """Whether the Pallas kernel compiles here: a GPU or TPU, with T a multiple of the block and the block of g."""
  block = min(block_tokens, tokens)
  return jax.default_backend() in ("gpu", "tpu") and tokens % block == 0 and block % group == 0


def cpu_supported() -> bool:
  """Whether the FFI kernels run: the CPU backend, no device mesh (XLA cannot split a custom call over
  devices), and lowbit.cc built here."""
  return (jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().size <= 1
          and cpu_kernel_registered())


def resolve_implementation(implementation: str | None, tokens: int, group: int) -> str:
  """`implementation`, or for None: `pallas` where `pallas_supported`, `cpu` where `cpu_supported`, else `xla`."""
  if implementation is None:
    if pallas_supported(tokens, group):
      return "pallas"
    return "cpu" if cpu_supported() else "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  return implementation


def _check_cpu(*arrays: jax.Array) -> None:
  if not cpu_kernel_registered():
    raise RuntimeError("the lowbit CPU kernel is unavailable here (see the log); use implementation='xla'")
  floats = [a.dtype for a in arrays if a.dtype != jnp.uint8]
  if any(d != jnp.float32 for d in floats):
    raise ValueError(f"the cpu implementation takes float32 operands, got {floats}")


def _cpu_call(target: str, shape: tuple[int, ...], a: jax.Array, codes: jax.Array, scale: jax.Array,
              zero: jax.Array, bits: int) -> jax.Array:
  """The FFI kernel over the flattened batch-head axis N = B K, back to [B, K, ...]."""
  b, k = codes.shape[:2]
  flat = lambda x: x.reshape(b * k, *x.shape[2:])
  out = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((b * k, *shape), jnp.float32))(
      flat(a), flat(codes), flat(scale), flat(zero), bits=np.int32(bits))
  return out.reshape(b, k, *shape)


def lowbit_scores(q: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int,
                  implementation: str | None = None) -> jax.Array:
  """q [B, K, G, Dh], codes [B, K, T, Dh * bits / 8] uint8, scale / zero [B, K, T / g, Dh] -> scores
  float32 [B, K, G, T] = q . k_hat / sqrt(Dh).

  implementation: `pallas` (compiled), `pallas_interpret` (the kernel interpreted, for CPU tests), `cpu` (the
  FFI kernel, float32), `xla` (the reference), or None (`resolve_implementation`).
  """
  implementation = resolve_implementation(implementation, codes.shape[2], codes.shape[2] // scale.shape[2])
  if implementation == "xla":
    return reference.lowbit_scores(q, codes, scale, zero, bits=bits)
  if implementation == "cpu":
    _check_cpu(q, scale, zero)
    scaled = q * q.shape[-1] ** -0.5
    return _cpu_call(SCORES_TARGET, (q.shape[2], codes.shape[2]), scaled, codes, scale, zero, bits)
  return pallas.lowbit_scores(q, codes, scale, zero, bits=bits, interpret=implementation == "pallas_interpret")


def lowbit_weighted_values(probs: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int,
                           implementation: str | None = None) -> jax.Array:
  """probs [B, K, G, T] times the values codes [B, K, T, Dh * bits / 8], scale / zero [B, K, T, Dh / g_v]
  -> float32 [B, K, G, Dh].

  implementation: `cpu` (the FFI kernel, float32) or `xla` (the reference); the Pallas names and None resolve
  as in `lowbit_scores`, and where that gives a Pallas kernel the reference runs (values have none yet).
  """
  implementation = resolve_implementation(implementation, codes.shape[2], 1)
  if implementation == "cpu":
    _check_cpu(probs, scale, zero)
    dh = codes.shape[-1] * 8 // bits
    return _cpu_call(VALUES_TARGET, (probs.shape[2], dh), probs, codes, scale, zero, bits)
  return reference.lowbit_weighted_values(probs, codes, scale, zero, bits=bits)
