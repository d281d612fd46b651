"""Decode attention over a float32 KV cache on XLA:CPU: the AVX2 FFI kernels of decode_cpu.cc.

Why: a decode step reads the whole cache for a few query rows, so it is bound by memory bandwidth, and
XLA:CPU's dots stream the cache at about half the rate a plain reduction over the same arrays reaches. The
kernels read each K and V row once for all query rows of its KV head. Measured on the 2-core AMD EPYC dev
machine, 16 rows x 4160 slots, head 128, one KV head, two query rows, scores + softmax + values, median of 20
interleaved runs: XLA 6.46 ms, these kernels 3.08 ms, an XLA sum over the same K and V 2.23 ms (the mask and
softmax then in XLA between the two products; `dense_probabilities` now takes them over each row of scores
while it is in cache). pangu.nn.attention's `cpu` implementation uses them.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from pangu_kernels import ffi

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_cpu.cc")
PROBABILITIES_TARGET, VALUES_TARGET = "pangu_dense_probabilities", "pangu_dense_weighted_values"


def kernel_registered() -> bool:
  """Whether decode_cpu.cc is built and registered here (compiled once per process; False: see the log)."""
  return ffi.register(SOURCE, ((PROBABILITIES_TARGET, "DenseProbabilities"), (VALUES_TARGET, "DenseWeightedValues")))


def unsupported(*arrays: jax.Array) -> str | None:
  """None where the kernels run on these operands, else why not."""
  if jax.default_backend() != "cpu":
    return "not the CPU backend"
  if any(a.dtype != jnp.float32 for a in arrays):
    return f"float32 only, got {[str(a.dtype) for a in arrays]}"
  if jax.sharding.get_abstract_mesh().size > 1:
    return "a device mesh (XLA cannot split a custom call over devices)"
  if not kernel_registered():
    return "decode_cpu.cc does not build or load here (see the log)"
  return None


def _call(target: str, a: jax.Array, cache: jax.Array, width: int, *extra: jax.Array, **attributes) -> jax.Array:
  b, k, rows = a.shape[:3]
  flat = lambda x: x.reshape(b * k, *x.shape[2:])
  out = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((b * k, rows, width), jnp.float32))(
      flat(a), flat(cache), *extra, **attributes)
  return out.reshape(b, k, rows, width)


def dense_weighted_values(probs: jax.Array, values: jax.Array) -> jax.Array:
  """probs [B, K, R, T], values [B, K, T, Dh] -> sum_t p v float32 [B, K, R, Dh]."""
  reason = unsupported(probs, values)
  if reason is not None:
    raise ValueError(f"dense_weighted_values: the CPU kernel cannot run: {reason}")
  return _call(VALUES_TARGET, probs, values, values.shape[3])


def dense_probabilities(q: jax.Array, keys: jax.Array, visible: jax.Array,
                        logit_softcap: float | None = None) -> jax.Array:
  """q [B, K, R, Dh], keys [B, K, T, Dh], visible [B, R, T] (bool, the same for every KV head) -> the attention
  probabilities float32 [B, K, R, T]: the softmax over the visible slots of q . k, soft-capped first
  (c tanh(s / c)) where logit_softcap is set; rows that see nothing get 1 / T each."""
  reason = unsupported(q, keys)
  if reason is not None:
    raise ValueError(f"dense_probabilities: the CPU kernel cannot run: {reason}")
  if logit_softcap is not None and not logit_softcap > 0:
    raise ValueError(f"dense_probabilities: logit_softcap must be > 0 or None, got {logit_softcap}")
  if visible.shape != (q.shape[0], q.shape[2], keys.shape[2]):
    raise ValueError(f"dense_probabilities: visible must be [B, R, T] = {(q.shape[0], q.shape[2], keys.shape[2])}, "
                     f"got {visible.shape}")
  return _call(PROBABILITIES_TARGET, q, keys, keys.shape[2], visible.astype(jnp.bool_),
               softcap=np.float32(logit_softcap or 0.0))
