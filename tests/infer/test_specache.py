"""SpeCache: the KIVI quantiser and the speculative top-k against float64 NumPy, the cache against the dense
cache's exact decoding."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import infer, models
from pangu.infer import quantized_kv, specache
from pangu.infer.kv_cache import DenseLayerCache
from pangu.infer.quantized_kv import QuantConfig
from pangu.infer.specache import SpeCacheConfig, SpeCacheLayerCache
from pangu.parallel import host_memory
from pangu_kernels.specache import api as kernel_api

CONFIG = models.tiny(n_heads=4, n_kv_heads=2, d_model=64)  # head dim 16, two query heads per KV head
PROMPT, STEPS = 45, 24  # a partial residual block, and a flush at 64 within the steps
# One cache config for the decoding tests, so they share compiles: k = 128 covers every low-bit slot.
COVERING = SpeCacheConfig(QuantConfig(bits=1, group=16), residual=32, top_k=128)


def _random_params(config, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(s.shape[-1]), s.dtype),
                      nn.unbox(models.abstract_params(config)))


@pytest.fixture(scope="module")
def model():
  return CONFIG, _random_params(CONFIG)


def _numpy_quantise(x, bits, levels):
  """float64 reference quantiser over the last axis (one group per row)."""
  low, high = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
  if bits == 1 and levels == "quarter":
    zero, scale = (3 * low + high) / 4, (high - low) / 2
  else:
    zero, scale = low, (high - low) / (2 ** bits - 1)
  codes = np.clip(np.round((x - zero) / np.where(scale > 0, scale, 1)), 0, 2 ** bits - 1)
  return np.where(scale > 0, codes * scale + zero, x), scale


@pytest.mark.parametrize("bits,levels", [(2, "minmax"), (1, "minmax"), (1, "quarter")])
def test_keys_per_channel_and_values_per_token_match_numpy_within_half_a_step(bits, levels):
  cfg = QuantConfig(bits=bits, group=32, one_bit_levels=levels)
  x = np.random.default_rng(bits).normal(size=(2, 2, 64, 16))
  x[0, 0, :32, 3] = 0.25  # a constant key group reconstructs exactly
  keys = quantized_kv.quantize_keys(jnp.asarray(x, jnp.float32), cfg)
  values = quantized_kv.quantize_values(jnp.asarray(x, jnp.float32), cfg)
  assert keys.codes.dtype == jnp.uint8 and keys.codes.shape == (2, 2, 64, 16 * bits // 8)
  assert keys.scale.shape == (2, 2, 2, 16) and values.scale.shape == (2, 2, 64, 1)  # g_v = min(32, 16)
  got_k = np.asarray(quantized_kv.dequantize(keys, bits, keys=True))
  got_v = np.asarray(quantized_kv.dequantize(values, bits, keys=False))
  # Keys: groups of 32 tokens per channel; values: each token's 16 channels.
  grouped = x.reshape(2, 2, 2, 32, 16).swapaxes(3, 4)
  want_k, step_k = _numpy_quantise(grouped, bits, levels)
  want_k = want_k.swapaxes(3, 4).reshape(x.shape)
  want_v, step_v = _numpy_quantise(x, bits, levels)
  np.testing.assert_allclose(got_k, want_k, atol=1e-5)
  np.testing.assert_allclose(got_v, want_v, atol=1e-5)
  bound_k = np.repeat(step_k[..., 0], 32, axis=2) / 2  # [B, K, groups, Dh] -> per token
  assert np.all(np.abs(got_k - x) <= bound_k + 1e-5)
  assert np.all(np.abs(got_v - x) <= step_v / 2 + 1e-5)
  np.testing.assert_array_equal(got_k[0, 0, :32, 3], 0.25)


def test_one_bit_quarter_levels_sit_at_the_quarter_points_and_beat_minmax():
  x = np.random.default_rng(0).normal(size=(1, 1, 4096, 16)).astype(np.float32)
  errors = {}
  for levels in ("quarter", "minmax"):
    low = quantized_kv.quantize_values(jnp.asarray(x), QuantConfig(bits=1, group=16, one_bit_levels=levels))
    got = np.asarray(quantized_kv.dequantize(low, 1, keys=False))
    errors[levels] = np.mean((got - x) ** 2)
  lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
  low = quantized_kv.quantize_values(jnp.asarray(x), QuantConfig(bits=1, group=16))
  got = np.asarray(quantized_kv.dequantize(low, 1, keys=False))
  at_quarter = np.isclose(got, (3 * lo + hi) / 4, atol=1e-5) | np.isclose(got, (lo + 3 * hi) / 4, atol=1e-5)
  assert at_quarter.all()
  assert errors["quarter"] < 0.7 * errors["minmax"]


def _prefill(config, params, tokens, extra):
  cache = infer.init_cache(config, jnp.zeros((tokens.shape[0],), jnp.int32), tokens.shape[1] + extra)
  logits, cache = infer.extend(config, params, jnp.asarray(tokens), cache)
  return logits, cache


def test_topk_covering_the_whole_context_equals_full_attention(model):
  """k >= every low-bit slot: each step's mixed cache is exact, so SpeCache decodes like the dense cache
  (through a residual flush at token 64)."""
  config, params = model
  sequence = np.random.default_rng(3).integers(0, config.vocab_size, (2, PROMPT + STEPS + 1)).astype(np.int32)
  _, dense = _prefill(config, params, sequence[:, :PROMPT], STEPS + 1)
  cache = specache.to_specache(dense, COVERING)
  _, cache = specache.predecode(config, params, cache, jnp.asarray(sequence[:, PROMPT]))
  for step in range(STEPS):
    token = jnp.asarray(sequence[:, PROMPT + step])
    want, dense = specache.cached_step(config, params, dense, token)
    got, _, cache = specache.specache_step(config, params, cache, token, jnp.asarray(sequence[:, PROMPT + step + 1]))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  layer = jax.tree.map(lambda a: a[0], cache.layers).read()
  assert np.all(np.asarray(cache.layers.quantized) == 64)  # the flush happened
  np.testing.assert_array_equal(np.asarray(cache.layers.lengths), PROMPT + STEPS)
  assert layer.keys.shape[2] == 96 + 34


def test_speculative_row_never_reaches_the_real_tokens_output(model):
  config, params = model
  sequence = np.random.default_rng(4).integers(0, config.vocab_size, (2, PROMPT + 1)).astype(np.int32)
  _, dense = _prefill(config, params, sequence[:, :PROMPT], STEPS + 1)
  cache = specache.to_specache(dense, COVERING)
  _, cache = specache.predecode(config, params, cache, jnp.asarray(sequence[:, PROMPT]))
  token = jnp.asarray(sequence[:, PROMPT])
  real_a, spec_a, after_a = specache.specache_step(config, params, cache, token, jnp.array([1, 2]))
  real_b, spec_b, after_b = specache.specache_step(config, params, cache, token, jnp.array([300, 7]))
  np.testing.assert_array_equal(real_a, real_b)
  assert not np.allclose(spec_a, spec_b)  # the speculative row does see its own token
  # Only the real token is stored, and the speculative one only changed which rows were prefetched.
  for after in (after_a, after_b):
    np.testing.assert_array_equal(after.layers.lengths, PROMPT + 1)
    np.testing.assert_array_equal(after.next_positions, PROMPT + 1)
  np.testing.assert_array_equal(after_a.layers.host_keys[:, :, :, :PROMPT + 1],
                                after_b.layers.host_keys[:, :, :, :PROMPT + 1])


def test_incremental_flush_equals_quantising_from_scratch(model):
  config, params = model
  sequence = np.random.default_rng(5).integers(0, config.vocab_size, (2, PROMPT + STEPS + 1)).astype(np.int32)
  _, dense = _prefill(config, params, sequence[:, :PROMPT], STEPS + 1)
  cache = specache.to_specache(dense, COVERING)
  for t in range(PROMPT, PROMPT + STEPS):
    _, _, cache = specache.specache_step(config, params, cache, jnp.asarray(sequence[:, t]), jnp.zeros(2, jnp.int32))
    _, dense = specache.cached_step(config, params, dense, jnp.asarray(sequence[:, t]))
  scratch = specache.to_specache(dense, COVERING)
  # 69 tokens: the flush at the write after the residual reached 32 moved tokens 32..63 to the low-bit store.
  # Layer 0's keys depend on the tokens alone (later layers' on the approximate attention), so compare it.
  got, want = (jax.tree.map(lambda a: a[0], c.layers) for c in (cache, scratch))
  np.testing.assert_array_equal(got.quantized, 64)
  np.testing.assert_array_equal(want.quantized, 64)
  for field in ("keys_low", "values_low"):
    for name, a, b in zip(("codes", "scale", "zero"), getattr(got, field), getattr(want, field)):
      width = 64 if name == "codes" or field == "values_low" else 4
      np.testing.assert_allclose(a[:, :, :width], b[:, :, :width], rtol=1e-6, atol=1e-6, err_msg=f"{field}.{name}")
  np.testing.assert_allclose(got.residual_keys[:, :, :5], want.residual_keys[:, :, :5], rtol=1e-6)


def _numpy_topk(cache, queries, full_precision_rows=True, gqa_reduce="mean_prob"):
  """float64 reference of the speculative top-k (spec section 3.5, step 4) for the last query row queries
  [B, K, G, Dh]: its attention over the keys attention reads (low-bit keys, the held rows at full precision,
  then the residual), the probabilities averaged over each KV group, the top k of the candidates (the low-bit
  slots, and the residual's first R when a flush is due) -> a set of store slots per row and head. The low-bit
  keys come from the library's dequantisation, itself checked against NumPy above."""
  cfg, t, r = cache.config, cache.slots, cache.config.residual
  keys = np.asarray(quantized_kv.dequantize(cache.keys_low, cfg.quant.bits, keys=True), np.float64)
  host, index = np.asarray(cache.host_keys, np.float64), np.asarray(cache.topk_index)
  b, kv = keys.shape[:2]
  for row, head in np.ndindex(b, kv):
    held = index[row, head][index[row, head] < t]
    if full_precision_rows:
      keys[row, head, held] = host[row, head, held]
  keys = np.concatenate([keys, np.asarray(cache.residual_keys, np.float64)], axis=2)
  logits = np.einsum("bkgd,bktd->bkgt", np.asarray(queries, np.float64), keys) / np.sqrt(keys.shape[-1])
  quantized, lengths = np.asarray(cache.quantized)[:, None], np.asarray(cache.lengths)[:, None]
  in_residual = np.arange(keys.shape[2] - t)[None] < lengths - quantized
  seen = np.concatenate([np.arange(t)[None] < quantized, in_residual], axis=1)
  flush_due = (lengths - quantized >= r) & (np.arange(keys.shape[2] - t)[None] < r)
  candidate = seen & np.concatenate([np.ones((b, t), bool), flush_due], axis=1)
  probs = np.exp(np.where(seen[:, None, None], logits, -np.inf) - logits.max(-1, keepdims=True))
  group_votes = (probs / probs.sum(-1, keepdims=True)) if gqa_reduce == "mean_prob" else logits
  votes = np.where(candidate[:, None], group_votes.mean(2), -np.inf)
  slot = lambda row, i: i if i < t else quantized[row, 0] + i - t
  return [[{slot(row, i) for i in np.argsort(-votes[row, head])[:cfg.top_k]} for head in range(kv)]
          for row in range(b)]


def _cache_and_queries(cfg, seed, drop, rows=1, dh=16):
  """A SpeCache layer after a dense prefill of 70 tokens less `drop` per row (2 rows, 2 KV heads of 3 query heads
  each), which has attended once (so it holds a top-k), and the next `rows` query rows."""
  from pangu.nn.attention import AttentionMask
  rng = np.random.default_rng(seed)
  b, kv, g = 2, 2, 3
  tokens = rng.normal(size=(2, b, 70, kv, dh)).astype(np.float32)
  dense = DenseLayerCache.empty(b, kv, 70, dh, jnp.float32).write(
      jnp.asarray(tokens[0]), jnp.asarray(tokens[1]), jnp.tile(jnp.arange(70, dtype=jnp.int32), (b, 1)))
  cache = SpeCacheLayerCache.from_dense(dense.drop_last(jnp.asarray(drop)), cfg)
  queries = jnp.asarray(rng.normal(size=(2, b, rows, kv * g, dh)), jnp.float32)
  _, cache = cache.attend(queries[0], AttentionMask(q_positions=cache.lengths[:, None] + jnp.arange(rows)))
  return cache, queries[1]


def _as_sets(index):
  return [[set(np.asarray(index)[row, head]) for head in range(index.shape[1])] for row in range(index.shape[0])]


@pytest.mark.parametrize("implementation", ["xla", "pallas_interpret", "cpu"])
def test_speculative_topk_is_the_attention_row_over_the_keys_attention_read(implementation):
  """Every scoring path (the XLA reference, the Pallas kernel, the CPU kernel) picks the top-k from the attention
  row over K_mix: the held rows at full precision."""
  from pangu.nn.attention import AttentionMask
  if implementation == "cpu" and not kernel_api.cpu_kernel_registered():
    pytest.skip("the lowbit CPU kernel does not build on this machine")
  cfg = SpeCacheConfig(QuantConfig(bits=1, group=16), residual=32, top_k=8, implementation=implementation)
  cache, queries = _cache_and_queries(cfg, 8, [0, 20])  # 64 and 32 low-bit slots
  assert np.all(np.asarray(cache.topk_index) < np.asarray(cache.quantized)[:, None, None])
  _, chosen = cache.attend(queries, AttentionMask(q_positions=cache.lengths[:, None]))
  last_row = queries[:, -1].reshape(2, 2, 3, -1)
  want = _numpy_topk(cache, last_row)
  assert want != _numpy_topk(cache, last_row, full_precision_rows=False)  # the held rows change the choice
  assert _as_sets(chosen.topk_index) == want


@pytest.mark.parametrize("implementation", ["xla", "cpu"])
def test_mean_logit_votes_rank_the_group_mean_of_the_logits(implementation):
  """The `mean_logit` ablation: the top-k of the KV group's mean logit over the keys attention read, not of its
  mean probability (the two choose differently here)."""
  from pangu.nn.attention import AttentionMask
  if implementation == "cpu" and not kernel_api.cpu_kernel_registered():
    pytest.skip("the lowbit CPU kernel does not build on this machine")
  cfg = SpeCacheConfig(QuantConfig(bits=1, group=16), residual=32, top_k=8, implementation=implementation,
                       gqa_reduce="mean_logit")
  cache, queries = _cache_and_queries(cfg, 8, [0, 20])
  _, chosen = cache.attend(queries, AttentionMask(q_positions=cache.lengths[:, None]))
  last_row = queries[:, -1].reshape(2, 2, 3, -1)
  want = _numpy_topk(cache, last_row, gqa_reduce="mean_logit")
  assert want != _numpy_topk(cache, last_row)
  assert _as_sets(chosen.topk_index) == want


@pytest.mark.parametrize("implementation", ["xla", "cpu"])
@pytest.mark.parametrize("bits,top_k,softcap,window", [(1, 8, None, None), (2, 0, 5.0, None), (1, 8, None, 40)])
def test_attending_in_place_equals_attention_over_read(implementation, bits, top_k, softcap, window):
  """`attend` (scores and weighted values from the packed codes, the held rows as corrections) gives the output
  of the reference attention over `read`, and without a window the top-k of the NumPy reference: one row
  mid-residual, one with a flush due (the residual's first R are candidates), two query rows (the real token and
  the speculative one), GQA, softcap and a sliding window."""
  from pangu.nn.attention import AttentionMask, xla_attention
  if implementation == "cpu" and not kernel_api.cpu_kernel_registered():
    pytest.skip("the lowbit CPU kernel does not build on this machine")
  cfg = SpeCacheConfig(QuantConfig(bits=bits, group=16), residual=32, top_k=top_k, implementation=implementation)
  cache, queries = _cache_and_queries(cfg, bits + top_k, [0, 8], rows=2, dh=32)  # 64 + 6 and 32 + 30 tokens
  new = jnp.asarray(np.random.default_rng(top_k).normal(size=(2, 2, 2, 2, 32)), jnp.float32)
  positions = cache.lengths[:, None] + jnp.arange(2, dtype=jnp.int32)
  cache = cache.write(new[0], new[1], positions)
  assert list(cache.lengths - cache.quantized) == [8, 32]  # row 1's residual is full: a flush is due
  mask = AttentionMask(q_positions=positions, window=window)

  got, chosen = jax.jit(lambda c, q: c.attend(q, mask, softcap))(cache, queries)
  read = cache.read()
  want = xla_attention(queries, read.keys, read.values, mask.replace(kv_positions=read.positions,
                       kv_lengths=read.lengths), kv_heads_major=True, logit_softcap=softcap)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  if top_k and window is None:
    assert _as_sets(chosen.topk_index) == _numpy_topk(cache, queries[:, -1].reshape(2, 2, 3, -1))
    assert int(chosen.fetched_rows - cache.fetched_rows) == 2 * 2 * top_k


@pytest.mark.parametrize("bits,group", [(1, 16), (2, 8)])
def test_device_bytes_equal_the_closed_form(bits, group):
  cfg = SpeCacheConfig(QuantConfig(bits=bits, group=group), residual=16, top_k=8)
  dense = DenseLayerCache.empty(3, 2, 70, 16, jnp.float32).write(
      jnp.ones((3, 20, 2, 16)), jnp.ones((3, 20, 2, 16)), jnp.tile(jnp.arange(20, dtype=jnp.int32), (3, 1)))
  cache = SpeCacheLayerCache.from_dense(dense, cfg)
  assert cache.slots == 80
  want = specache.specache_device_bytes(cfg, batch=3, kv_heads=2, head_dim=16, slots=80, itemsize=4)
  assert cache.device_bytes() == want
  assert cache.host_bytes() == 2 * 3 * 2 * 80 * 16 * 4


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="residual"):
    SpeCacheConfig(QuantConfig(group=32), residual=48)
  with pytest.raises(ValueError, match="bits"):
    QuantConfig(bits=3)
  with pytest.raises(ValueError, match="gqa_reduce"):
    SpeCacheConfig(gqa_reduce="max")
  with pytest.raises(ValueError, match="SpeCacheConfig.implementation must be one of"):
    SpeCacheConfig(implementation="triton")


def test_eviction_baselines_keep_the_tokens_their_rule_names(model):
  """StreamingLLM keeps sinks + the latest window; H2O the recent tokens + the heaviest older ones, and with
  a budget covering everything both decode exactly like the dense cache."""
  from pangu.infer import eviction_cache
  config, params = model
  sequence = np.random.default_rng(6).integers(0, config.vocab_size, (2, 24)).astype(np.int32)
  recorder = infer.init_cache(config, jnp.zeros(2, jnp.int32), 30, layer_cache=eviction_cache.AttentionMassRecorder.empty)
  _, recorder = infer.extend(config, params, jnp.asarray(sequence[:, :20]), recorder)
  layer0 = jax.tree.map(lambda a: a[0], recorder.layers)
  mass = np.asarray(layer0.mass)
  np.testing.assert_allclose(mass.sum(1), 20 * config.n_heads, rtol=1e-5)  # each query's row sums to 1 per head
  dense = recorder.map_layers(lambda r: r.dense)
  sink = jax.tree.map(lambda a: a[0], eviction_cache.to_sink_window(dense, sinks=2, window=5).layers)
  np.testing.assert_array_equal(np.sort(np.asarray(sink.positions), 1), [[0, 1, 15, 16, 17, 18, 19]] * 2)
  heavy = jax.tree.map(lambda a: a[0], eviction_cache.to_heavy_hitter(recorder, budget=6, recent=3).layers)
  older = np.argsort(-mass[:, :17], axis=1)[:, :3]
  for row in range(2):
    assert set(np.asarray(heavy.positions[row])) == set(older[row]) | {17, 18, 19}
  # Budgets covering the whole sequence: decoding equals the dense cache's.
  full_sink = eviction_cache.to_sink_window(dense, sinks=2, window=28)
  full_heavy = eviction_cache.to_heavy_hitter(recorder, budget=30, recent=3)
  for t in range(20, 23):
    token = jnp.asarray(sequence[:, t])
    want, dense = specache.cached_step(config, params, dense, token)
    got_sink, full_sink = specache.cached_step(config, params, full_sink, token)
    got_heavy, full_heavy = specache.cached_step(config, params, full_heavy, token)
    np.testing.assert_allclose(got_sink, want, atol=2e-5)
    np.testing.assert_allclose(got_heavy, want, atol=2e-5)


def test_generate_loop_equals_stepwise_calls_with_speculative_and_exact_topk(model):
  """`specache_generate` (pre-decoding, then the compiled loop over a donated cache) feeds the same tokens,
  picks the same slots and fetches as many rows as `predecode` and `specache_step` called one at a time; its
  `exact` ablation pre-decodes each step's real token first, so it fetches twice the rows per step."""
  config, params = model
  sequence = np.random.default_rng(8).integers(0, config.vocab_size, (2, PROMPT + 1)).astype(np.int32)
  _, dense = _prefill(config, params, sequence[:, :PROMPT], STEPS + 2)
  start = specache.to_specache(dense, SpeCacheConfig(QuantConfig(bits=1, group=16), residual=32, top_k=4))
  token, steps = jnp.asarray(sequence[:, PROMPT]), 6
  fetched = {}
  for exact in (False, True):
    first, cache = specache.predecode(config, params, start, token)
    real, spec, fed = token, jnp.argmax(first, -1).astype(jnp.int32), []
    for _ in range(steps):
      fed.append(np.asarray(real))
      if exact:
        _, cache = specache.predecode(config, params, cache, real)
      logits, spec_logits, cache = specache.specache_step(config, params, cache, real, spec)
      real, spec = jnp.argmax(logits, -1).astype(jnp.int32), jnp.argmax(spec_logits, -1).astype(jnp.int32)
    got, looped = specache.specache_generate(config, params, jax.tree.map(jnp.copy, start), token, steps, exact)
    np.testing.assert_array_equal(np.asarray(got), np.stack(fed, 1))
    np.testing.assert_array_equal(np.asarray(looped.layers.topk_index), np.asarray(cache.layers.topk_index))
    fetched[exact] = int(specache.fetched_rows(looped))
    assert fetched[exact] == int(specache.fetched_rows(cache))
  first_pick = int(specache.fetched_rows(specache.predecode(config, params, start, token)[1]))
  assert fetched[True] - first_pick == 2 * (fetched[False] - first_pick) > 0


def test_host_store_in_pinned_host_memory_and_async_prefetch_decode_like_the_synchronous_path(model):
  """The full-precision store placed in pinned_host memory (jax exposes it on CPU too): its arrays report that
  memory kind before and after the donated decode loop, and the asynchronous prefetch (rows gathered on the
  host and copied when chosen) feeds the same tokens, picks the same slots and moves as many rows as fetching
  them when read (`sync`) from a store in default memory, through a residual flush."""
  config, params = model
  assert host_memory.has_pinned_host(jax.devices()[0])
  sequence = np.random.default_rng(7).integers(0, config.vocab_size, (2, PROMPT + 1)).astype(np.int32)
  _, dense = _prefill(config, params, sequence[:, :PROMPT], STEPS + 1)
  small_k = SpeCacheConfig(QuantConfig(bits=1, group=16), residual=32, top_k=8)  # k < slots: the choice matters
  token = jnp.asarray(sequence[:, PROMPT])
  runs = []
  for prefetch, offload in (("sync", False), ("async", True)):
    cache = specache.to_specache(dense, dataclasses.replace(small_k, prefetch=prefetch))
    if offload:
      cache = specache.offload_host_store(cache)
      assert cache.layers.host_keys.sharding.memory_kind == "pinned_host"
    first, cache = specache.predecode(config, params, cache, token)
    tokens, cache = specache.specache_decode(config, params, cache, token, jnp.argmax(first, -1).astype(jnp.int32),
                                             STEPS)
    memory = {a.sharding.memory_kind for a in (cache.layers.host_keys, cache.layers.host_values)}
    assert memory == ({"pinned_host"} if offload else {"device"})
    runs.append((np.asarray(tokens), np.asarray(cache.layers.topk_index), np.asarray(cache.layers.topk_keys)[0],
                 int(specache.fetched_rows(cache)), np.asarray(cache.layers.quantized)))
  (want_tokens, want_index, _, want_rows, _), (got_tokens, got_index, got_rows_kept, got_rows, got_q) = runs
  np.testing.assert_array_equal(got_tokens, want_tokens)
  np.testing.assert_array_equal(got_index, want_index)
  assert got_rows == want_rows > 0
  np.testing.assert_array_equal(got_q, 64)  # the flush happened inside the loop
  # The asynchronously prefetched rows are the host store's rows at the chosen slots.
  layer0 = jax.tree.map(lambda a: a[0], cache.layers)
  want_kept = np.take_along_axis(np.asarray(layer0.host_keys), np.minimum(got_index[0], layer0.slots - 1)[..., None],
                                 axis=2)
  valid = (got_index[0] < layer0.slots)[..., None]
  np.testing.assert_array_equal(np.where(valid, got_rows_kept, 0), np.where(valid, want_kept, 0))
