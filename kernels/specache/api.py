"""Scores of queries against bit-packed low-bit keys (SpeCache's prefetch choice), the kernel where it compiles."""

import jax

from pangu_kernels.specache import pallas, reference

IMPLEMENTATIONS = ("pallas", "pallas_interpret", "xla")


def pallas_supported(tokens: int, group: int, block_tokens: int = pallas.DEFAULT_BLOCK_TOKENS) -> bool:
  """Whether the kernel compiles here: a GPU or TPU, with T a multiple of the block and the block of g."""
  block = min(block_tokens, tokens)
  return jax.default_backend() in ("gpu", "tpu") and tokens % block == 0 and block % group == 0


def resolve_implementation(implementation: str | None, tokens: int, group: int) -> str:
  """`implementation`, or for None the kernel where `pallas_supported`, else `xla`."""
  if implementation is None:
    return "pallas" if pallas_supported(tokens, group) else "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  return implementation


def lowbit_scores(q: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int,
                  implementation: str | None = None) -> jax.Array:
  """q [B, K, G, Dh], codes [B, K, T, Dh * bits / 8] uint8, scale / zero [B, K, T / g, Dh] -> scores
  float32 [B, K, G, T] = q . k_hat / sqrt(Dh).

  implementation: `pallas` (compiled), `pallas_interpret` (the kernel interpreted, for CPU tests), `xla` (the
  reference), or None: the kernel where `pallas_supported`, else the reference.
  """
  implementation = resolve_implementation(implementation, codes.shape[2], codes.shape[2] // scale.shape[2])
  if implementation == "xla":
    return reference.lowbit_scores(q, codes, scale, zero, bits=bits)
  return pallas.lowbit_scores(q, codes, scale, zero, bits=bits, interpret=implementation == "pallas_interpret")
