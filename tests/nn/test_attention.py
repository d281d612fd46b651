"""The attention entry point: every mask kind and implementation against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import models
from pangu.nn import attention
from pangu.nn.attention import AttentionMask, dot_product_attention
from pangu_kernels.attention import cpu as kernel_cpu

B, S, H, K, DH = 2, 7, 4, 2, 8


def _reference(q, k, v, *, q_pos, kv_pos, causal=True, window=None, kv_lengths=None, q_seg=None, kv_seg=None,
               softcap=None):
  """float64 loops over rows, heads, queries and keys, written from the AttentionMask docstring."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, s, h, dh = q.shape
  t, group = k.shape[1], h // k.shape[2]
  out = np.zeros_like(q)
  for row in range(b):
    for head in range(h):
      for i in range(s):
        seen = []
        for j in range(t):
          ok = kv_pos[row, j] >= 0
          ok &= not causal or kv_pos[row, j] <= q_pos[row, i]
          ok &= window is None or abs(q_pos[row, i] - kv_pos[row, j]) < window
          ok &= kv_lengths is None or j < kv_lengths[row]
          ok &= q_seg is None or q_seg[row, i] == kv_seg[row, j]
          seen.append(ok)
        scores = k[row, :, head // group] @ q[row, i, head] / np.sqrt(dh)
        if softcap is not None:
          scores = softcap * np.tanh(scores / softcap)
        scores = np.where(seen, scores, -np.inf) if any(seen) else np.zeros(t)
        w = np.exp(scores - scores.max())
        out[row, i, head] = (w / w.sum()) @ v[row, :, head // group]
  return out


def _inputs(t=S, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, S, H, DH)).astype(np.float32)
  k, v = (rng.normal(size=(B, t, K, DH)).astype(np.float32) for _ in "kv")
  return q, k, v


ARANGE = np.broadcast_to(np.arange(S), (B, S))
SEGMENTS = np.array([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]])
LEFT_PADDED = np.array([np.arange(S) - 2, np.arange(S)])  # row 0: two padding slots at negative positions
# name -> (AttentionMask kwargs, reference kwargs)
MASKS = {
    "causal": ({}, {}),
    "full": (dict(causal=False), dict(causal=False)),
    "segment_ids": (dict(q_segment_ids=SEGMENTS, kv_segment_ids=SEGMENTS), dict(q_seg=SEGMENTS, kv_seg=SEGMENTS)),
    "ragged_kv_lengths": (dict(kv_lengths=np.array([4, 7])), dict(kv_lengths=[4, 7])),
    "window": (dict(window=3), dict(window=3)),
    "window_full": (dict(window=2, causal=False), dict(window=2, causal=False)),
    "left_padding_positions": (dict(q_positions=LEFT_PADDED, kv_positions=LEFT_PADDED),
                               dict(q_pos=LEFT_PADDED, kv_pos=LEFT_PADDED)),
}


def _mask(kwargs):
  return AttentionMask(**{k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()})


@pytest.mark.parametrize("implementation", ["xla", "cudnn", "pallas"])  # pallas: the kernels, interpreted on CPU
@pytest.mark.parametrize("name", sorted(MASKS))
def test_every_mask_kind_matches_the_float64_reference(name, implementation):
  mask_kwargs, ref_kwargs = MASKS[name]
  q, k, v = _inputs()
  got = dot_product_attention(q, k, v, _mask(mask_kwargs), implementation=implementation)
  want = _reference(q, k, v, **{"q_pos": ARANGE, "kv_pos": ARANGE, **ref_kwargs})
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("implementation,queries", [("xla", S), ("pallas", S), ("pallas", 1), ("cpu", S), ("cpu", 1)])
def test_soft_cap_and_the_kv_cache_layout(implementation, queries):
  """With pallas, S queries go to flash attention over the cache layout, one query to the decode kernel; with
  cpu, both to the AVX2 decode products (left padding, ragged lengths, soft-cap, GQA)."""
  if implementation == "cpu" and kernel_cpu.unsupported(jnp.zeros(1)) is not None:
    pytest.skip(f"the CPU decode kernel cannot run here: {kernel_cpu.unsupported(jnp.zeros(1))}")
  q, k, v = _inputs(t=9)
  q, q_pos = q[:, -queries:], (ARANGE + 2)[:, -queries:]
  kv_pos = np.broadcast_to(np.arange(9) - 2, (B, 9))
  mask = AttentionMask(q_positions=jnp.asarray(q_pos), kv_positions=jnp.asarray(kv_pos), kv_lengths=jnp.array([9, 8]))
  got = dot_product_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask, kv_heads_major=True, logit_softcap=2.0,
                              implementation=implementation)
  want = _reference(q, k, v, q_pos=q_pos, kv_pos=kv_pos, kv_lengths=[9, 8], softcap=2.0)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_gradients_of_xla_and_cudnn_agree():
  q, k, v = _inputs()
  mask = _mask(MASKS["segment_ids"][0])
  grad = lambda impl: jax.grad(lambda *a: jnp.sum(jnp.sin(dot_product_attention(*a, mask, implementation=impl))),
                               argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grad("cudnn"), grad("xla")):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_auto_picks_the_cpu_kernels_or_the_reference_on_cpu_and_explicit_choices_that_cannot_run_raise():
  q, k, v = _inputs()
  mask = AttentionMask()
  cpu_runs = kernel_cpu.unsupported(jnp.asarray(q)) is None
  assert attention.resolve_implementation("auto", q, k, mask) == ("cpu" if cpu_runs else "xla")  # never interpreted
  bf16 = jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
  assert attention.resolve_implementation("auto", *bf16, mask) == "xla"  # the CPU kernels take float32 only
  with pytest.raises(ValueError, match="'cpu' cannot run this call: float32 only"):
    dot_product_attention(*bf16, bf16[1], mask, implementation="cpu")
  assert attention.resolve_implementation("pallas", q, k, mask) == "pallas"  # asked for: interpreted
  with pytest.raises(ValueError, match="'cudnn' cannot run this call: .*soft-cap"):
    dot_product_attention(q, k, v, mask, implementation="cudnn", logit_softcap=5.0)
  with pytest.raises(ValueError, match="must be one of"):
    dot_product_attention(q, k, v, mask, implementation="flash")
  with pytest.raises(ValueError, match="kv_lengths has shape"):
    dot_product_attention(q, k, v, AttentionMask(kv_lengths=jnp.ones((3,), jnp.int32)))


def test_a_registered_pallas_slot_is_called(monkeypatch):
  q, k, v = _inputs()
  calls = []

  def fake_kernel(q, k, v, mask, **kwargs):
    calls.append(mask.is_index_causal)
    return attention.xla_attention(q, k, v, mask, **kwargs)

  monkeypatch.setitem(attention._REGISTRY, "pallas", attention.AttentionImplementation(
      fake_kernel, lambda q, k, mask, cap: None if mask.is_index_causal else "index-causal masks only"))
  want = dot_product_attention(q, k, v, AttentionMask(), implementation="xla")
  np.testing.assert_array_equal(dot_product_attention(q, k, v, AttentionMask(), implementation="pallas"), want)
  assert calls == [True]
  with pytest.raises(ValueError, match="index-causal masks only"):
    dot_product_attention(q, k, v, AttentionMask(window=2), implementation="pallas")
  with pytest.raises(ValueError, match="slots are"):
    attention.register_attention_implementation("auto", fake_kernel, lambda *a: None)


def test_the_model_gives_the_same_logits_with_every_runnable_implementation():
  config = models.tiny(sliding_window=5)
  params = models.init_params(config, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11)).astype(np.int32)
  want = models.forward(config, params, tokens)
  got = models.forward(config.replace(attention_implementation="cudnn"), params, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The window changes the logits of tokens more than 5 positions in, and only those.
  full = models.forward(config.replace(sliding_window=None), params, tokens)
  np.testing.assert_allclose(full[:, :5], want[:, :5], atol=1e-6)
  assert not np.allclose(full[:, 5:], want[:, 5:], atol=1e-4)
