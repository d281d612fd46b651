"""Flash and decode attention with a structural mask, choosing the Pallas kernels where they compile."""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from pangu_kernels.attention import decode, pallas, reference
from pangu_kernels.attention.pallas import BlockSizes
from pangu_kernels.attention.reference import MaskArrays, Spec

IMPLEMENTATIONS = ("xla", "pallas", "pallas_interpret")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def pallas_unsupported(dtype, head_dim: int, blocks: tuple[int, ...] = dataclasses.astuple(BlockSizes())) -> str | None:
  """None where the kernels compile here, else the reason: they are written for the Triton lowering (GPU), whose
  loads and dots need power-of-two shapes of at least 16. Head dims above 128 are refused: the default tiles
  would outgrow an H100 / H200's 228 KB of shared memory (float32 K / V stages alone take 256 KB at Dh = 256)."""
  if jax.default_backend() != "gpu":
    return f"the Pallas attention kernels compile for GPU (Triton) only, not {jax.default_backend()}"
  if jnp.dtype(dtype) not in _DTYPES:
    return f"the kernels take float32, bfloat16 or float16, got {jnp.dtype(dtype)}"
  if not _is_power_of_two(head_dim) or not pallas.MIN_BLOCK <= head_dim <= 128:
    return f"the kernels need a power-of-two head dim in [16, 128], got {head_dim}"
  if not all(_is_power_of_two(block) and block >= pallas.MIN_BLOCK for block in blocks):
    return f"the kernels need power-of-two blocks >= {pallas.MIN_BLOCK}, got {blocks}"
  return None


@functools.cache
def _log_once(message: str) -> None:
  logging.getLogger(__name__).info(message)


def _choose(implementation: str | None, dtype, head_dim: int, blocks: tuple[int, ...]) -> str:
  """`xla`, `pallas` or `pallas_interpret`: None picks `pallas` where it compiles (logging why not elsewhere)."""
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  if implementation in ("xla", "pallas_interpret"):
    return implementation
  reason = pallas_unsupported(dtype, head_dim, blocks)
  if reason is None:
    return "pallas"
  if implementation == "pallas":
    raise ValueError(f"implementation='pallas' cannot run here: {reason} (use 'pallas_interpret' to interpret)")
  _log_once(f"attention: the XLA reference instead of the Pallas kernel: {reason}")
  return "xla"


def _check(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskArrays, spec: Spec) -> None:
  """Raises ValueError naming what does not fit."""
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"need q [B, S, H, Dh] and k, v of one 4-d shape, got {q.shape}, {k.shape}, {v.shape}")
  if not q.dtype == k.dtype == v.dtype or q.dtype not in _DTYPES:
    raise ValueError(f"q, k and v must share a float32 / bfloat16 / float16 dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  b, s, h, dh = q.shape
  kv_heads, t = pallas.kv_shape(k, spec)
  if k.shape[0] != b or k.shape[-1] != dh or h % kv_heads:
    raise ValueError(f"q {q.shape} does not fit k {k.shape} (kv_heads_major={spec.kv_heads_major}): same batch and "
                     "head dim, and kv heads dividing query heads")
  expected = {"q_positions": (b, s), "kv_positions": (b, t), "kv_lengths": (b,), "q_segment_ids": (b, s),
              "kv_segment_ids": (b, t)}
  for name, shape in expected.items():
    value = getattr(mask, name)
    if value is not None and value.shape != shape:
      raise ValueError(f"{name} has shape {value.shape}, expected {shape}")
  if (mask.q_segment_ids is None) != (mask.kv_segment_ids is None):
    raise ValueError("give segment ids for both queries and keys, or neither")
  if spec.window is not None and (not isinstance(spec.window, int) or spec.window < 1):
    raise ValueError(f"window must be a positive int or None, got {spec.window!r}")
  if spec.logit_softcap is not None and not spec.logit_softcap > 0:
    raise ValueError(f"logit_softcap must be > 0 or None, got {spec.logit_softcap!r}")


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                    q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None,
                    kv_lengths: jax.Array | None = None, window: int | None = None,
                    logit_softcap: float | None = None, kv_heads_major: bool = False,
                    block_sizes: BlockSizes = BlockSizes(), implementation: str | None = None) -> jax.Array:
  """Scaled dot-product GQA, differentiable: q [B, S, H, Dh], k / v [B, T, K, Dh] (K divides H) -> [B, S, H, Dh].

  Query s of row b sees key t iff kv_positions[b, t] >= 0, t < kv_lengths[b], kv_positions[b, t] <=
  q_positions[b, s] (causal), |q_positions[b, s] - kv_positions[b, t]| < window, and the segment ids match;
  positions default to 0..S-1 / 0..T-1, and a query that sees no key gets the mean of the values (reference.py).

  Args:
    segment_ids: int [B, S], packed sequences; kv_segment_ids: int [B, T], defaults to segment_ids when T == S.
    logit_softcap: scores become softcap * tanh(scores / softcap) before masking; None: off.
    kv_heads_major: k and v are in the KV cache's [B, K, T, Dh] layout (read in place, no transpose).
    block_sizes: the kernels' tiles (`pallas.BlockSizes`); any S and T work, padded to whole blocks.
    implementation: `pallas` (the FlashAttention-2 kernels, forward and backward; raises where they do not
      compile), `pallas_interpret` (the same kernels interpreted, on any backend), `xla` (the reference) or
      None: `pallas` where it compiles, else `xla`.
  """
  if segment_ids is not None and kv_segment_ids is None:
    if k.shape[2 if kv_heads_major else 1] != q.shape[1]:
      raise ValueError("pass kv_segment_ids when the key and query lengths differ")
    kv_segment_ids = segment_ids
  mask = MaskArrays(q_positions, kv_positions, kv_lengths, segment_ids, kv_segment_ids)
  spec = Spec(causal, window, logit_softcap, kv_heads_major)
  _check(q, k, v, mask, spec)
  implementation = _choose(implementation, q.dtype, q.shape[-1], dataclasses.astuple(block_sizes))
  if implementation == "xla":
    return reference.attention(q, k, v, mask, spec)
  return pallas.flash_attention(q, k, v, mask, spec=spec, block_sizes=block_sizes,
                                interpret=implementation == "pallas_interpret")


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array | None = None,
                     kv_positions: jax.Array | None = None, kv_lengths: jax.Array | None = None,
                     causal: bool = True, window: int | None = None, logit_softcap: float | None = None,
                     block_k: int = decode.DEFAULT_BLOCK_K, num_splits: int | None = None,
                     implementation: str | None = None) -> jax.Array:
  """A few queries q [B, S, H, Dh] against a KV cache k / v [B, K, T, Dh] -> [B, S, H, Dh] (forward only).

  The mask is `flash_attention`'s without segment ids: kv_positions are the slots' token positions (negative:
  empty or padding) and kv_lengths [B] the slots written per row, so rows may be ragged.

  Args:
    block_k: cache slots per kernel block.
    num_splits: the cache length is split this many ways, each split's partial softmax computed in parallel and
      combined; None: enough splits for about `decode.TARGET_PROGRAMS` programs.
    implementation: as in `flash_attention`.
  """
  mask = MaskArrays(q_positions, kv_positions, kv_lengths)
  spec = Spec(causal, window, logit_softcap, kv_heads_major=True)
  _check(q, k, v, mask, spec)
  if not isinstance(block_k, int) or block_k < 1 or (num_splits is not None and num_splits < 1):
    raise ValueError(f"block_k and num_splits must be positive ints, got {block_k!r}, {num_splits!r}")
  implementation = _choose(implementation, q.dtype, q.shape[-1], (block_k,))
  if implementation == "xla":
    return reference.attention(q, k, v, mask, spec)
  return decode.decode_attention(q, k, v, mask, spec=spec, block_k=block_k, num_splits=num_splits,
                                 interpret=implementation == "pallas_interpret")
