"""Attention's products over bit-packed low-bit K / V (SpeCache's and KIVI's cache), the kernel where it runs.

`lowbit_scores` (queries . keys) has a Pallas kernel (GPU / TPU, interpreted on CPU for tests) and an FFI kernel
for XLA:CPU (lowbit.cc: AVX2, and AVX-512's mask registers for 1-bit codes where the CPU has them; `cpu_avx2`
runs the AVX2 build alone, the path other CPUs take); `lowbit_weighted_values` (attention weights . values)
has the FFI kernel. Both read the codes in place; their XLA references dequantise the whole cache first.
`mixed_scores` and `mixed_weighted_values` are the same products over SpeCache's mixed cache (some low-bit
slots held at full precision, full-precision rows after them), and `mixed_probabilities` its scores' masked
softmax: one FFI call each on CPU, else the reference's composition around the low-bit product.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from pangu_kernels import ffi
from pangu_kernels.specache import pallas, reference

IMPLEMENTATIONS = ("pallas", "pallas_interpret", "cpu", "cpu_avx2", "xla")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lowbit.cc")
_HANDLERS = {"scores": "LowbitScores", "values": "LowbitWeightedValues", "probabilities": "LowbitProbabilities"}
_TARGETS = {build: {product: f"pangu_lowbit_{product}{suffix}" for product in _HANDLERS}
            for build, suffix in (("cpu", ""), ("cpu_avx2", "_avx2"))}


def cpu_kernel_registered(implementation: str = "cpu") -> bool:
  """Whether lowbit.cc is built and registered here as `implementation` (`cpu`: with AVX-512 where the CPU has
  it; `cpu_avx2`: without); compiled once per process; False: see the log."""
  wide = implementation == "cpu" and ffi.cpu_has("avx512f", "avx512bw", "avx512vl")
  targets = tuple((_TARGETS[implementation][product], handler) for product, handler in _HANDLERS.items())
  return ffi.register(SOURCE, targets, ffi.AVX512 if wide else ())


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


def _check_cpu(implementation: str, *arrays: jax.Array) -> None:
  if not cpu_kernel_registered(implementation):
    raise RuntimeError(f"the lowbit {implementation} kernel is unavailable here (see the log); use "
                       "implementation='xla'")
  floats = [a.dtype for a in arrays if a.dtype not in (jnp.uint8, jnp.int32)]
  if any(d != jnp.float32 for d in floats):
    raise ValueError(f"the cpu implementation takes float32 operands, got {floats}")


def _cpu_call(implementation: str, product: str, shape: tuple[int, ...], a: jax.Array, codes: jax.Array,
              scale: jax.Array, zero: jax.Array, bits: int, held: jax.Array | None = None,
              held_rows: jax.Array | None = None, exact_rows: jax.Array | None = None, *extra: jax.Array,
              **attributes) -> jax.Array:
  """The FFI kernel `product` (a key of _HANDLERS) over the flattened batch-head axis N = B K, back to
  [B, K, ...]; no held or exact rows where they are None; `extra` operands and `attributes` passed as they are."""
  _check_cpu(implementation, *(x for x in (a, codes, scale, zero, held, held_rows, exact_rows) if x is not None))
  b, k = codes.shape[:2]
  dh = codes.shape[-1] * 8 // bits
  no_rows = jnp.zeros((b, k, 0, dh), jnp.float32)
  held = jnp.zeros((b, k, 0), jnp.int32) if held is None else held
  held_rows = no_rows if held_rows is None else held_rows
  exact_rows = no_rows if exact_rows is None else exact_rows
  flat = lambda x: x.reshape(b * k, *x.shape[2:])
  out = jax.ffi.ffi_call(_TARGETS[implementation][product], jax.ShapeDtypeStruct((b * k, *shape), jnp.float32))(
      flat(a), flat(codes), flat(scale), flat(zero), flat(held.astype(jnp.int32)), flat(held_rows),
      flat(exact_rows), *extra, bits=np.int32(bits), **attributes)
  return out.reshape(b, k, *shape)


def lowbit_scores(q: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int,
                  implementation: str | None = None) -> jax.Array:
  """q [B, K, G, Dh], codes [B, K, T, Dh * bits / 8] uint8, scale / zero [B, K, T / g, Dh] -> scores
  float32 [B, K, G, T] = q . k_hat / sqrt(Dh).

  implementation: `pallas` (compiled), `pallas_interpret` (the kernel interpreted, for CPU tests), `cpu` (the
  FFI kernel, float32), `cpu_avx2` (its AVX2 build), `xla` (the reference), or None (`resolve_implementation`).
  """
  implementation = resolve_implementation(implementation, codes.shape[2], codes.shape[2] // scale.shape[2])
  if implementation == "xla":
    return reference.lowbit_scores(q, codes, scale, zero, bits=bits)
  if implementation in _TARGETS:
    shape = (q.shape[2], codes.shape[2])
    return _cpu_call(implementation, "scores", shape, q * q.shape[-1] ** -0.5, codes, scale, zero, bits)
  return pallas.lowbit_scores(q, codes, scale, zero, bits=bits, interpret=implementation == "pallas_interpret")


def lowbit_weighted_values(probs: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int,
                           implementation: str | None = None) -> jax.Array:
  """probs [B, K, G, T] times the values codes [B, K, T, Dh * bits / 8], scale / zero [B, K, T, Dh / g_v]
  -> float32 [B, K, G, Dh].

  implementation: `cpu` / `cpu_avx2` (the FFI kernel, float32) or `xla` (the reference); the Pallas names and
  None resolve as in `lowbit_scores`, and where that gives a Pallas kernel the reference runs (values have none
  yet).
  """
  implementation = resolve_implementation(implementation, codes.shape[2], 1)
  if implementation in _TARGETS:
    dh = codes.shape[-1] * 8 // bits
    return _cpu_call(implementation, "values", (probs.shape[2], dh), probs, codes, scale, zero, bits)
  return reference.lowbit_weighted_values(probs, codes, scale, zero, bits=bits)


def mixed_scores(q: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, held: jax.Array,
                 held_keys: jax.Array, exact_keys: jax.Array, *, bits: int,
                 implementation: str | None = None) -> jax.Array:
  """Scores over the mixed cache -> float32 [B, K, G, T + E]: `lowbit_scores` at the T low-bit slots, except
  the held slots held [B, K, k] (outside [0, T): none), scored against their full-precision rows held_keys
  [B, K, k, Dh]; then the E rows exact_keys [B, K, E, Dh]. implementation: as in `lowbit_scores`."""
  implementation = resolve_implementation(implementation, codes.shape[2], codes.shape[2] // scale.shape[2])
  if implementation in _TARGETS:
    shape = (q.shape[2], codes.shape[2] + exact_keys.shape[2])
    return _cpu_call(implementation, "scores", shape, q * q.shape[-1] ** -0.5, codes, scale, zero, bits, held,
                     held_keys, exact_keys)
  low = functools.partial(lowbit_scores, implementation=implementation)
  return reference.mixed_scores(q, codes, scale, zero, held, held_keys, exact_keys, bits=bits, lowbit_scores=low)


def mixed_weighted_values(probs: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, held: jax.Array,
                          held_values: jax.Array, exact_values: jax.Array, *, bits: int,
                          implementation: str | None = None) -> jax.Array:
  """Weights probs [B, K, G, T + E] times the mixed cache's values -> float32 [B, K, G, Dh]: the low-bit
  values, each held slot's full-precision row held_values [B, K, k, Dh] in place of its v_hat, then the E rows
  exact_values [B, K, E, Dh]. implementation: as in `lowbit_weighted_values`."""
  implementation = resolve_implementation(implementation, codes.shape[2], 1)
  if implementation in _TARGETS:
    return _cpu_call(implementation, "values", (probs.shape[2], held_values.shape[-1]), probs, codes, scale, zero,
                     bits, held, held_values, exact_values)
  return reference.mixed_weighted_values(probs, codes, scale, zero, held, held_values, exact_values, bits=bits)


def mixed_probabilities(q: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, held: jax.Array,
                        held_keys: jax.Array, exact_keys: jax.Array, visible: jax.Array, *, bits: int,
                        logit_softcap: float | None = None, implementation: str | None = None) -> jax.Array:
  """Attention probabilities over the mixed cache -> float32 [B, K, G, T + E]: the softmax over the slots
  visible [B, G, T + E] (bool, the same for every KV head) of `mixed_scores`, soft-capped first where
  logit_softcap is set. On CPU one FFI call (the softmax runs over each row while the kernel has it in cache),
  else the reference around `lowbit_scores`. implementation: as in `lowbit_scores`."""
  implementation = resolve_implementation(implementation, codes.shape[2], codes.shape[2] // scale.shape[2])
  shape = (q.shape[2], codes.shape[2] + exact_keys.shape[2])
  if logit_softcap is not None and not logit_softcap > 0:
    raise ValueError(f"mixed_probabilities: logit_softcap must be > 0 or None, got {logit_softcap}")
  if visible.shape != (q.shape[0], *shape):
    raise ValueError(f"mixed_probabilities: visible must be [B, G, T + E] = {(q.shape[0], *shape)}, "
                     f"got {visible.shape}")
  if implementation in _TARGETS:
    return _cpu_call(implementation, "probabilities", shape, q * q.shape[-1] ** -0.5, codes, scale, zero, bits,
                     held, held_keys, exact_keys, visible.astype(jnp.bool_),
                     softcap=np.float32(logit_softcap or 0.0))
  low = functools.partial(lowbit_scores, implementation=implementation)
  return reference.mixed_probabilities(q, codes, scale, zero, held, held_keys, exact_keys, visible, bits=bits,
                                       logit_softcap=logit_softcap, lowbit_scores=low)
