"""The flash attention kernels (interpreted on CPU) against the plain-XLA reference: outputs and dq, dk, dv.

Tolerances: float32 1e-5 (the root conftest sets the highest matmul precision, so kernel and reference differ by
float32 rounding only); bfloat16 2e-2 (the kernels multiply p and ds in bfloat16, as FlashAttention does, while the
reference stays in float32). Shapes are small and blocks 8 wide, so that every case spans several q and kv blocks
and ends in partial ones; interpretation costs seconds per compile.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pangu_kernels
from pangu_kernels import attention
from pangu_kernels.attention import decode, pallas
from pangu_kernels.attention.reference import MaskArrays, Spec

SMALL_BLOCKS = attention.BlockSizes(block_q=8, block_k=8, block_q_backward=8, block_k_backward=8)
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _left_padded_positions(lengths, width):
  """int32 [B, width]: row b's last lengths[b] slots hold positions 0.., the slots before it -1 .. -pad."""
  return np.stack([np.arange(width) - (width - n) for n in lengths]).astype(np.int32)


# name -> (batch, q_len, kv_len, heads, kv_heads, dtype, flash_attention kwargs)
CASES = {
    # GQA, plain causal, lengths that end in a partial block.
    "causal_gqa": (2, 13, 13, 4, 2, jnp.float32, {}),
    # Multi-head, everything visible.
    "full_mha": (2, 9, 9, 2, 2, jnp.float32, dict(causal=False)),
    # A chunk of 6 queries at positions 15..20 against 21 keys (T != S), MQA, one row holding only 17 keys.
    "chunk_against_longer_kv_ragged": (2, 6, 21, 4, 1, jnp.float32,
                                       dict(q_positions=np.broadcast_to(np.arange(15, 21), (2, 6)).astype(np.int32),
                                            kv_lengths=np.array([21, 17], np.int32))),
    # Packed documents: blocks of other documents are skipped, the partly shared ones masked.
    "segment_ids": (2, 16, 16, 4, 2, jnp.float32,
                    dict(segment_ids=np.array([[0] * 3 + [1] * 9 + [2] * 4, [0] * 16], np.int32))),
    "window_softcap": (1, 19, 19, 4, 2, jnp.float32, dict(window=5, logit_softcap=3.0)),
    # Left-padded prompts in the cache layout: padding queries see no key and get the mean of the values.
    "left_padding_cache_layout": (2, 11, 11, 4, 2, jnp.float32,
                                  dict(q_positions=_left_padded_positions([11, 6], 11),
                                       kv_positions=_left_padded_positions([11, 6], 11), kv_heads_major=True)),
    "bfloat16_window": (2, 21, 21, 4, 2, jnp.bfloat16, dict(window=7)),
}


def _inputs(batch, q_len, kv_len, heads, kv_heads, dtype, kv_heads_major=False, head_dim=16, seed=0):
  rng = np.random.default_rng(seed)
  kv_shape = (batch, kv_heads, kv_len, head_dim) if kv_heads_major else (batch, kv_len, kv_heads, head_dim)
  q, cotangent = (jnp.asarray(rng.normal(size=(batch, q_len, heads, head_dim)), dtype) for _ in "qc")
  k, v = (jnp.asarray(rng.normal(size=kv_shape), dtype) for _ in "kv")
  return q, k, v, cotangent


def _output_and_grads(q, k, v, cotangent, **kwargs):
  """(out, (dq, dk, dv)) of flash_attention under one jit (one compile of forward and backward)."""
  def run(q, k, v, cotangent):
    out, vjp = jax.vjp(lambda q, k, v: pangu_kernels.flash_attention(q, k, v, **kwargs), q, k, v)
    return out, vjp(cotangent)
  return jax.jit(run)(q, k, v, cotangent)


def _assert_close(got, want, tolerance):
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_forward_and_gradients_match_the_reference(name):
  batch, q_len, kv_len, heads, kv_heads, dtype, kwargs = CASES[name]
  kwargs = {key: jnp.asarray(value) if isinstance(value, np.ndarray) else value for key, value in kwargs.items()}
  q, k, v, cotangent = _inputs(batch, q_len, kv_len, heads, kv_heads, dtype, kwargs.get("kv_heads_major", False))
  got = _output_and_grads(q, k, v, cotangent, implementation="pallas_interpret", block_sizes=SMALL_BLOCKS, **kwargs)
  want = _output_and_grads(q, k, v, cotangent, implementation="xla", **kwargs)
  out, grads = got
  assert out.dtype == dtype and [g.shape for g in grads] == [q.shape, k.shape, v.shape]
  for got_array, want_array in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_close(got_array, want_array, TOLERANCE[dtype])


def test_programs_visit_only_the_blocks_their_mask_reaches():
  """The kv range of each q block (forward, dq) and q range of each kv block (dk, dv), from block summaries."""
  def ranges(spec, q_pos, kv_pos, segments=None):
    mask = pallas.BlockMask(jnp.asarray(q_pos)[None], jnp.asarray(kv_pos)[None],
                            *([None] * 2 if segments is None else [jnp.asarray(segments)[None]] * 2))
    seen = pallas.visible_blocks(mask, spec, 16, 16)
    return [np.stack(pallas.block_span(seen, axis))[:, 0].T.tolist() for axis in (2, 1)]

  index = np.arange(64)
  # Causal: q block i reads kv blocks 0..i, kv block j is read by q blocks j..3 (half the work of full attention).
  assert ranges(Spec(), index, index) == [[[0, 1], [0, 2], [0, 3], [0, 4]], [[0, 4], [1, 4], [2, 4], [3, 4]]]
  # Queries one position ahead of their slots: the last query of q block i sees the first key of kv block i + 1.
  assert ranges(Spec(), index + 1, index)[0] == [[0, 2], [0, 3], [0, 4], [0, 4]]
  # A window of 16 reaches one block back.
  assert ranges(Spec(window=16), index, index)[0] == [[0, 1], [0, 2], [1, 3], [2, 4]]
  # Two packed documents of 32 tokens never read each other's blocks, even without causality.
  assert ranges(Spec(causal=False), index, index, index // 32)[0] == [[0, 2], [0, 2], [2, 4], [2, 4]]
  # 20 slots of left padding: the padding block is never read, and a q block of padding reads nothing.
  padded = index - 20
  assert ranges(Spec(), padded, padded)[0] == [[0, 0], [1, 2], [1, 3], [1, 4]]


def _triton_calls(fn, *args) -> int:
  """How many Triton kernels `fn` lowers to for a GPU, lowered here on CPU: every op in them must have a Triton
  lowering rule and power-of-two shapes (what compiling for a GPU checks first; only PTX generation is left)."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text().count("__gpu$xla.gpu.triton")


def test_the_kernels_lower_for_gpu():
  q, cotangent = (jax.ShapeDtypeStruct((2, 300, 8, 128), jnp.bfloat16) for _ in "qc")
  k = v = jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, 300), jnp.int32)

  def forward_and_backward(q, k, v, cotangent, positions, segment_ids):
    mask = MaskArrays(positions, positions, None, segment_ids, segment_ids)
    out, vjp = jax.vjp(lambda q, k, v: pallas.flash_attention(q, k, v, mask, spec=Spec(window=64, logit_softcap=30.0)),
                       q, k, v)
    return out, vjp(cotangent)

  assert _triton_calls(forward_and_backward, q, k, v, cotangent, ids, ids) == 3  # forward, dq, dk + dv
  cache = jax.ShapeDtypeStruct((2, 2, 1000, 128), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
  attend = lambda q, k, v, lengths: decode.decode_attention(q, k, v, MaskArrays(kv_lengths=lengths),
                                                           spec=Spec(kv_heads_major=True), num_splits=4)
  step = jax.ShapeDtypeStruct((2, 1, 8, 128), jnp.bfloat16)
  assert _triton_calls(attend, step, cache, cache, lengths) == 2  # attention, and the mean for unseeing rows


def test_dispatch_and_validation():
  q, k, v, _ = _inputs(2, 5, 5, 4, 2, jnp.float32)
  assert jax.default_backend() == "cpu" and "GPU (Triton) only" in attention.pallas_unsupported(jnp.float32, 16)
  np.testing.assert_array_equal(pangu_kernels.flash_attention(q, k, v),  # None: the reference on CPU
                                pangu_kernels.flash_attention(q, k, v, implementation="xla"))
  with pytest.raises(ValueError, match="cannot run here: .*use 'pallas_interpret'"):
    pangu_kernels.flash_attention(q, k, v, implementation="pallas")
  with pytest.raises(ValueError, match="implementation must be one of"):
    pangu_kernels.flash_attention(q, k, v, implementation="triton")
  with pytest.raises(ValueError, match="does not fit k"):
    pangu_kernels.flash_attention(q[..., :3, :], k, v)
  with pytest.raises(ValueError, match=r"kv_lengths has shape \(3,\), expected \(2,\)"):
    pangu_kernels.flash_attention(q, k, v, kv_lengths=jnp.ones((3,), jnp.int32))
  with pytest.raises(ValueError, match="pass kv_segment_ids"):
    pangu_kernels.flash_attention(q, k[:, :4], v[:, :4], segment_ids=jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="window must be a positive int"):
    pangu_kernels.flash_attention(q, k, v, window=0)
  with pytest.raises(ValueError, match="BlockSizes.block_k must be a positive int"):
    attention.BlockSizes(block_k=0)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_default_blocks_on_longer_sequences(causal, dtype):
  """The default (GPU) tiles: several 128 x 64 forward blocks, a partial last one, GQA and head dim 64."""
  q, k, v, cotangent = _inputs(1, 300, 300, 4, 2, dtype, head_dim=64, seed=1)
  got = _output_and_grads(q, k, v, cotangent, causal=causal, implementation="pallas_interpret")
  want = _output_and_grads(q, k, v, cotangent, causal=causal, implementation="xla")
  for got_array, want_array in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_close(got_array, want_array, TOLERANCE[dtype])
