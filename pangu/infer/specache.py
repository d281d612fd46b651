"""SpeCache (Jie et al., ICML 2025): the full-precision KV cache off the device, a KIVI low-bit copy on it, and
each step's top-k full-precision pairs prefetched by a speculative next token.

Per layer and KV head (spec sections 3.1-3.5):
  1. Host store: every token's K and V at full precision. `offload_host_store` places it in the backend's
     `pinned_host` memory (jax memory kinds; CPU, GPU and TPU backends expose one); there every write and
     gather runs on the host inside the compiled step (`pangu.parallel.host_memory`), and only the gathered
     top-k rows cross to the device, an explicit copy counted in `fetched_rows`. Where the backend has no
     pinned_host memory the store stays in default memory (on CPU the same RAM) with the same accounting.
  2. Device: the low-bit keys (per channel over g tokens) and values (per token over g_v channels), bit-packed;
     a full-precision residual of the latest < R tokens (flushed into the low-bit store as one block of R when
     full, at the start of the next write, so a speculative token never enters it); the top-k buffer.
  3. Attention (`attend`, the cache's attention hook) reads the mixed cache: the low-bit keys with the top-k
     rows at full precision, then the residual, and likewise the values. The packed codes are read in place by
     pangu_kernels.specache (Pallas on GPU / TPU for the scores, an AVX2 FFI kernel on CPU for both products);
     the held rows enter as exact scores written over their slots and as corrections p (v - v_hat). `read`
     builds the same mixed cache as dense arrays (the LayerCache contract); XLA would dequantise the whole
     store into them every step, which on CPU costs more than reading the full-precision cache.
  4. After attending, the last query row (the speculative token's in a SpeCache step) picks the top-k: the
     attention probabilities it attended with, averaged over each KV group (`gqa_reduce`), the top-k low-bit
     positions, prefetched for the same layer's next step.
  5. Prefetch (`SpeCacheConfig.prefetch`). `async` (default): the gather and copy of layer l's next top-k rows
     are issued right after layer l's speculative scores, and consumed only by layer l
     of the next step; nothing else in the step waits for them, so the scheduler runs the copy beside layers
     l+1..L (on a GPU the host-to-device copy runs on its own stream; in `specache_decode`'s loop the copy
     issued at step t also overlaps the rest of step t). `sync`: only the indices are kept, and the rows are
     fetched when the next step reads the cache, on the attention's critical path. Both give equal outputs.

A SpeCache decode step (`specache_step`) runs [T_t, T'_{t+1}] at positions [p, p + 1] through the unchanged
model: causal masking hides the speculative key at p + 1 from the real token at p, and `drop_last(1)`
discards the speculative token's K/V before the next write. With `top_k = 0` the cache is KIVI (low-bit +
residual only). Prefill is exact (the dense cache); `SpeCacheLayerCache.from_dense` then compresses it.
"""

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from pangu.config_checks import one_of
from pangu.infer.kv_cache import DenseLayerCache, KVCache, extend_cache, write_rows
from pangu.infer.quantized_kv import LowBit, QuantConfig, dequantize, lowbit_bytes_per_token, quantize_keys, quantize_values
from pangu.models.config import TransformerConfig
from pangu.models.transformer import Decoder
from pangu.nn.attention import AttentionMask, CachedKV
from pangu.parallel import host_memory
from pangu_kernels import specache as kernel
from pangu_kernels.topk import top_k_indices

GQA_REDUCE = ("mean_prob", "mean_logit")
PREFETCH = ("async", "sync")
_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class SpeCacheConfig:
  """Attributes:
    quant: bits, group size and 1-bit level placement of the low-bit copy.
    residual: R, full-precision recent tokens before a flush; a multiple of the group size.
    top_k: k, full-precision pairs fetched per layer, KV head and step; 0 gives KIVI (no fetch).
    gqa_reduce: how a KV group's query heads vote: mean of probabilities (paper) or of logits.
    max_step_tokens: most tokens one decode write appends (the real and the speculative token: 2).
    implementation: pangu_kernels.specache implementation of attention's products over the packed codes (None:
      a kernel where one runs, else the XLA reference, which dequantises the store first).
    prefetch: `async` fetches the next step's top-k rows as soon as they are chosen, `sync` when they are
      read (module docstring, item 5).
  """

  quant: QuantConfig = QuantConfig()
  residual: int = 64
  top_k: int = 64
  gqa_reduce: str = "mean_prob"
  max_step_tokens: int = 2
  implementation: str | None = None
  prefetch: str = "async"

  def __post_init__(self):
    if not isinstance(self.residual, int) or self.residual < 1 or self.residual % self.quant.group:
      raise ValueError(f"SpeCacheConfig.residual must be a positive multiple of the group size {self.quant.group}, "
                       f"got {self.residual!r}")
    for name in ("top_k", "max_step_tokens"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < (name == "max_step_tokens"):
        raise ValueError(f"SpeCacheConfig.{name} must be a non-negative int (max_step_tokens >= 1), "
                         f"got {getattr(self, name)!r}")
    one_of(self, "gqa_reduce", GQA_REDUCE)
    one_of(self, "prefetch", PREFETCH)
    one_of(self, "implementation", (None, *kernel.IMPLEMENTATIONS))

  @property
  def residual_slots(self) -> int:
    """Device residual slots: R plus one step's tokens (the flush is lazy)."""
    return self.residual + self.max_step_tokens

  def store_slots(self, max_length: int) -> int:
    """Low-bit / host slots for a context of max_length: rounded up to whole residual blocks."""
    return -(-max_length // self.residual) * self.residual


def _on_store(fn, store: jax.Array, *operands: jax.Array) -> jax.Array:
  """fn(store, *operands) where the store lives: on the host (operands copied there first) for a pinned-host
  store, else in place. Index operands are computed on the device and clamped, since a host computation gets
  no bounds checks (`promise_in_bounds`)."""
  if host_memory.in_host_memory(store):
    return host_memory.compute_on_host(fn, store, *host_memory.to_host(operands))
  return fn(store, *operands)


def _store_write(store: jax.Array, new: jax.Array, offsets: jax.Array) -> jax.Array:
  """store [B, K, T, Dh] with new [B, K, S, Dh] written at each row's slots offsets[b] ..."""
  b, k, t, _ = store.shape
  slots = jnp.minimum(offsets[:, None, None] + jnp.arange(new.shape[2]), t - 1)
  rows, heads = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
  write = lambda s, n, r, h, c: s.at[r, h, c].set(n, mode="promise_in_bounds")
  return _on_store(write, store, new.astype(store.dtype), rows, heads, slots)


def _store_gather(store: jax.Array, index: jax.Array) -> jax.Array:
  """The rows [B, K, k, Dh] of store [B, K, T, Dh] at index [B, K, k] (clamped to T - 1), on the device: the
  one host -> device transfer of the cache."""
  b, k, t, _ = store.shape
  rows, heads = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
  gather = lambda s, r, h, i: s.at[r, h, i].get(mode="promise_in_bounds")
  out = _on_store(gather, store, rows, heads, jnp.minimum(index, t - 1))
  return host_memory.to_device(out) if host_memory.in_host_memory(store) else out


def _rows(fn):
  """fn over one row's [K, ...] arrays, mapped over the batch."""
  return jax.vmap(fn)


@flax.struct.dataclass
class SpeCacheLayerCache:
  """One layer's SpeCache state (see the module docstring). T: store slots, Rc: residual slots.

  Attributes:
    host_keys, host_values: [B, K, T, Dh] full precision (host side).
    positions: int32 [B, T] position of each stored token (-1: empty).
    lengths: int32 [B] tokens stored per row; quantized: int32 [B] of them in the low-bit store (a multiple of R).
    keys_low, values_low: the bit-packed low-bit copy (`LowBit`, device side).
    residual_keys, residual_values: [B, K, Rc, Dh] stored tokens quantized .. lengths; residual_positions [B, Rc].
    topk_index: int32 [B, K, k] low-bit slots held at full precision (T: none); topk_keys / values [B, K, k, Dh].
    fetched_rows: int32 [] K/V rows moved host -> device so far (each is 2 Dh elements).
    config: static.
  """

  host_keys: jax.Array
  host_values: jax.Array
  positions: jax.Array
  lengths: jax.Array
  quantized: jax.Array
  keys_low: LowBit
  values_low: LowBit
  residual_keys: jax.Array
  residual_values: jax.Array
  residual_positions: jax.Array
  topk_index: jax.Array
  topk_keys: jax.Array
  topk_values: jax.Array
  fetched_rows: jax.Array
  config: SpeCacheConfig = flax.struct.field(pytree_node=False)

  @classmethod
  def from_dense(cls, dense: DenseLayerCache, config: SpeCacheConfig) -> "SpeCacheLayerCache":
    """Compresses a prefilled dense layer cache: whole R-blocks of each row go low-bit, the rest is the
    residual (spec section 3.3). The top-k buffer starts empty (`attend` fills it)."""
    b, kv, t, dh = dense.keys.shape
    r, slots = config.residual, config.store_slots(t)
    pad = lambda a, axis, value=0: jnp.pad(a, [(0, slots + config.residual_slots - t) if i == axis else (0, 0)
                                                for i in range(a.ndim)], constant_values=value)
    keys, values, positions = pad(dense.keys, 2), pad(dense.values, 2), pad(dense.positions, 1, -1)
    quantized = dense.lengths // r * r
    resid = lambda a, axis: _rows(lambda row, start: jax.lax.dynamic_slice_in_dim(
        row, start, config.residual_slots, axis))(a, quantized)
    in_residual = jnp.arange(config.residual_slots)[None] < (dense.lengths - quantized)[:, None]
    host_keys, host_values = keys[:, :, :slots], values[:, :, :slots]
    k = config.top_k
    return cls(host_keys=host_keys, host_values=host_values,
               positions=positions[:, :slots], lengths=dense.lengths, quantized=quantized,
               keys_low=quantize_keys(host_keys, config.quant), values_low=quantize_values(host_values, config.quant),
               residual_keys=resid(keys, 1), residual_values=resid(values, 1),
               residual_positions=jnp.where(in_residual, resid(positions, 0), -1),
               topk_index=jnp.full((b, kv, k), slots, jnp.int32), topk_keys=jnp.zeros((b, kv, k, dh), dense.keys.dtype),
               topk_values=jnp.zeros((b, kv, k, dh), dense.keys.dtype), fetched_rows=jnp.zeros((), jnp.int32),
               config=config)

  @property
  def slots(self) -> int:
    return self.host_keys.shape[2]

  def _flush(self) -> "SpeCacheLayerCache":
    """Rows whose residual holds >= R tokens: its first R go low-bit as one block at slot `quantized`."""
    cfg, r = self.config, self.config.residual
    need = (self.lengths - self.quantized) >= r
    block_k = quantize_keys(self.residual_keys[:, :, :r], cfg.quant)
    block_v = quantize_values(self.residual_values[:, :, :r], cfg.quant)
    g = cfg.quant.group

    def put(store, block, slot_divisor):
      written = write_rows(store, block, self.quantized // slot_divisor, 1)
      return jnp.where(need.reshape(-1, *[1] * (store.ndim - 1)), written, store)

    keys_low = LowBit(put(self.keys_low.codes, block_k.codes, 1), put(self.keys_low.scale, block_k.scale, g),
                      put(self.keys_low.zero, block_k.zero, g))
    values_low = LowBit(*(put(store, block, 1) for store, block in zip(self.values_low, block_v)))
    shift = lambda a, axis, fill: jnp.where(need.reshape(-1, *[1] * (a.ndim - 1)), jnp.concatenate(
        [jax.lax.slice_in_dim(a, r, a.shape[axis], axis=axis),
         jnp.full_like(jax.lax.slice_in_dim(a, 0, r, axis=axis), fill)], axis=axis), a)
    return self.replace(keys_low=keys_low, values_low=values_low, quantized=self.quantized + need * r,
                        residual_keys=shift(self.residual_keys, 2, 0), residual_values=shift(self.residual_values, 2, 0),
                        residual_positions=shift(self.residual_positions, 1, -1))

  def write(self, keys: jax.Array, values: jax.Array, positions: jax.Array) -> "SpeCacheLayerCache":
    """Appends S <= max_step_tokens tokens (keys / values [B, S, K, Dh]) to the host store and the residual."""
    s = positions.shape[1]
    if s > self.config.max_step_tokens:
      raise ValueError(f"SpeCacheLayerCache.write: {s} tokens in one write, at most max_step_tokens="
                       f"{self.config.max_step_tokens}; prefill into a DenseLayerCache and use from_dense")
    # The flush touches only device arrays: the host store stays out of the cond.
    device = self.replace(host_keys=None, host_values=None)
    device = jax.lax.cond(jnp.any(self.lengths - self.quantized >= self.config.residual),
                          SpeCacheLayerCache._flush, lambda c: c, device)
    cache = device.replace(host_keys=self.host_keys, host_values=self.host_values)
    keys, values = keys.swapaxes(1, 2), values.swapaxes(1, 2)
    offset = cache.lengths - cache.quantized
    return cache.replace(
        host_keys=_store_write(cache.host_keys, keys, cache.lengths),
        host_values=_store_write(cache.host_values, values, cache.lengths),
        positions=write_rows(cache.positions, positions, cache.lengths, 0),
        residual_keys=write_rows(cache.residual_keys, keys, offset, 1),
        residual_values=write_rows(cache.residual_values, values, offset, 1),
        residual_positions=write_rows(cache.residual_positions, positions, offset, 0),
        lengths=cache.lengths + s)

  def _mixed(self, low: LowBit, residual: jax.Array, top: jax.Array, keys: bool) -> jax.Array:
    """[dequantised low-bit slots, residual] [B, K, T + Rc, Dh] with the top-k slots overwritten by their
    full-precision rows: concatenated first, so the rows are scattered once into the array attention reads."""
    dequantized = dequantize(low, self.config.quant.bits, keys=keys).astype(residual.dtype)
    mixed = jnp.concatenate([dequantized, residual], axis=2)
    index = jnp.where(self.topk_index < self.slots, self.topk_index, mixed.shape[2])  # out of range: dropped
    scatter = lambda rows, index, update: rows.at[index].set(update, mode="drop")
    return jax.vmap(jax.vmap(scatter))(mixed, index, top)

  def _top_rows(self) -> tuple[jax.Array, jax.Array]:
    """The full-precision rows of the top-k slots: prefetched (`async`) or fetched now (`sync`)."""
    if self.config.prefetch == "async":
      return self.topk_keys, self.topk_values
    return _store_gather(self.host_keys, self.topk_index), _store_gather(self.host_values, self.topk_index)

  def read(self) -> CachedKV:
    top_keys, top_values = self._top_rows()
    keys = self._mixed(self.keys_low, self.residual_keys, top_keys, True)
    values = self._mixed(self.values_low, self.residual_values, top_values, False)
    return self._positions()._replace(keys=keys, values=values)

  def _positions(self) -> CachedKV:
    """`read`'s slot positions [B, T + Rc] and lengths [B], without keys or values."""
    low_positions = jnp.where(jnp.arange(self.slots)[None] < self.quantized[:, None], self.positions, -1)
    positions = jnp.concatenate([low_positions, self.residual_positions], axis=1)
    return CachedKV(None, None, positions, self.slots + self.lengths - self.quantized)

  def _implementation(self) -> str:
    return kernel.resolve_implementation(self.config.implementation, self.slots, self.config.quant.group)

  def attend(self, queries: jax.Array, mask: AttentionMask,
             logit_softcap: float | None = None) -> tuple[jax.Array, "SpeCacheLayerCache"]:
    """Attention of queries [B, S, H, Dh] over the mixed cache `read` describes, reading the packed codes in
    place (the attention hook of LayerCache); then the last query row (the speculative token's in a SpeCache
    step) picks the next step's top-k from the probabilities it attended with and prefetches them.

    The probabilities (scores, mask and softmax in one call) and the weighted values are pangu_kernels.specache's
    over the mixed cache: the low-bit codes read in place, each held slot's full-precision row instead of its
    dequantisation (the spec's K_mix, and the values likewise), then the residual. mask: the query half
    (q_positions, causal, window); the cache gives the slots' positions and lengths. Equal to
    `dot_product_attention` over `read()`.
    """
    cfg = self.config
    b, s, h, dh = queries.shape
    kv = self.host_keys.shape[1]
    g = h // kv
    implementation = self._implementation()
    q = queries.astype(jnp.float32).reshape(b, s, kv, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, kv, s * g, dh)
    f32 = lambda a: a.astype(jnp.float32)
    top_keys, top_values = self._top_rows()
    cached = self._positions()
    seen = mask.replace(kv_positions=cached.positions, kv_lengths=cached.lengths).dense(s, cached.positions.shape[1])
    visible = jnp.repeat(seen, g, axis=1)
    keys = (*self.keys_low, self.topk_index, f32(top_keys), f32(self.residual_keys))
    probs = kernel.mixed_probabilities(q, *keys, visible, bits=cfg.quant.bits, logit_softcap=logit_softcap,
                                       implementation=implementation)
    out = kernel.mixed_weighted_values(probs, *self.values_low, self.topk_index, f32(top_values),
                                       f32(self.residual_values), bits=cfg.quant.bits, implementation=implementation)
    out = out.reshape(b, kv, s, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, s, h, dh).astype(queries.dtype)
    if cfg.top_k == 0:
      return out, self
    if cfg.gqa_reduce == "mean_prob":
      votes = probs
    else:  # the masked logits, computed again for this ablation (attention itself takes the probabilities)
      logits = kernel.mixed_scores(q, *keys, bits=cfg.quant.bits, implementation=implementation)
      if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
      votes = jnp.where(visible[:, None], logits, _MASKED)
    return out, self._fetch(self._select(votes.reshape(b, kv, s, g, -1)[:, :, -1]))

  def _select(self, votes: jax.Array) -> jax.Array:
    """The top-k store slots [B, K, k] (T: none) from the last query row's votes [B, K, G, T + Rc] (attention
    probabilities, or masked logits for `mean_logit`), averaged over each KV group (spec section 3.5, step 4).

    Candidates are the slots that are low-bit at the next step: the low-bit store, plus the residual's first R
    tokens when a flush is due (voted for at full precision, as they are still in the residual).
    """
    cfg, t, r = self.config, self.slots, self.config.residual
    low = jnp.arange(t)[None] < self.quantized[:, None]
    in_residual = jnp.arange(cfg.residual_slots)[None] < (self.lengths - self.quantized)[:, None]
    flush_due = (self.lengths - self.quantized >= r)[:, None]
    candidate = jnp.concatenate([low, in_residual[:, :r] & flush_due], 1)
    # The group mean as a sum of G slices: XLA:CPU handed the reduction over the middle axis to a library
    # call that a profile of the 4k-token step showed at up to 0.6 ms per layer; the sums fuse with the select.
    votes = sum(votes[:, :, i, :t + r] for i in range(votes.shape[2])) / votes.shape[2]
    votes = jnp.where(candidate[:, None], votes, -jnp.inf)
    k = min(cfg.top_k, t + r)
    index = top_k_indices(votes, k, implementation=None if self._implementation() == "cpu" else "xla")
    chosen = jnp.take_along_axis(jnp.broadcast_to(candidate[:, None], votes.shape), index, axis=-1)
    slot = jnp.where(index < t, index, self.quantized[:, None, None] + index - t)
    slot = jnp.where(chosen, slot, t)
    return jnp.pad(slot, ((0, 0), (0, 0), (0, cfg.top_k - k)), constant_values=t)

  def _fetch(self, index: jax.Array) -> "SpeCacheLayerCache":
    """Keeps the next step's top-k slots index [B, K, k], counting the rows that will cross to the device;
    `async` prefetch issues their host gather and copy now (`sync`: when read)."""
    cache = self.replace(topk_index=index,
                         fetched_rows=self.fetched_rows + jnp.sum(index < self.slots, dtype=jnp.int32))
    if self.config.prefetch == "sync":
      return cache
    return cache.replace(topk_keys=_store_gather(self.host_keys, index),
                         topk_values=_store_gather(self.host_values, index))

  def drop_last(self, n: jax.Array) -> "SpeCacheLayerCache":
    """Forgets the last n tokens (the speculative one); they sit in the residual, which the lazy flush keeps."""
    return self.replace(lengths=self.lengths - n)

  def device_bytes(self) -> int:
    """Bytes of the arrays on the device side (low-bit copy, residual, top-k buffer, positions, lengths)."""
    device = (*self.keys_low, *self.values_low, self.residual_keys, self.residual_values, self.residual_positions,
              self.topk_index, self.topk_keys, self.topk_values, self.positions, self.lengths, self.quantized)
    return sum(a.nbytes for a in device)

  def host_bytes(self) -> int:
    return self.host_keys.nbytes + self.host_values.nbytes


def specache_device_bytes(config: SpeCacheConfig, *, batch: int, kv_heads: int, head_dim: int, slots: int,
                          itemsize: int, scale_bytes: int = 4) -> float:
  """Closed form of `SpeCacheLayerCache.device_bytes` for one layer (spec section 3.6); scale_bytes = 2 gives
  the paper's 16-bit scale and zero. Positions and lengths are int32."""
  per_head = (slots * lowbit_bytes_per_token(head_dim, config.quant, scale_bytes)
              + 2 * (config.residual_slots + config.top_k) * head_dim * itemsize + 4 * config.top_k)
  return batch * kv_heads * per_head + batch * 4 * (slots + config.residual_slots + 2)


@functools.partial(jax.jit, static_argnums=1)
def to_specache(cache: KVCache, config: SpeCacheConfig) -> KVCache:
  """A prefilled dense `KVCache` compressed layer by layer (`SpeCacheLayerCache.from_dense`), in one compiled
  program rather than an op at a time."""
  return cache.map_layers(functools.partial(SpeCacheLayerCache.from_dense, config=config))


def offload_host_store(cache: KVCache, device: jax.Device | None = None) -> KVCache:
  """A SpeCache `KVCache` with every layer's full-precision store moved to `device`'s pinned_host memory (the
  first device by default), where the backend has that memory kind; unchanged otherwise (the store then stays
  in default memory, which on CPU is the same RAM). Steps run unchanged on either."""
  device = device or jax.devices()[0]
  if not host_memory.has_pinned_host(device):
    return cache
  host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
  place = lambda layer: layer.replace(host_keys=jax.device_put(layer.host_keys, host),
                                      host_values=jax.device_put(layer.host_values, host))
  if isinstance(cache.layers, tuple):
    return cache.replace(layers=tuple(place(layer) for layer in cache.layers))
  return cache.replace(layers=place(cache.layers))


def fetched_rows(cache: KVCache) -> jax.Array:
  """Host -> device K/V rows moved so far, summed over layers."""
  layers = cache.layers if isinstance(cache.layers, tuple) else (cache.layers,)
  return sum(jnp.sum(layer.fetched_rows) for layer in layers)


@functools.partial(jax.jit, static_argnums=0)
def specache_step(config: TransformerConfig, params: dict, cache: KVCache, tokens: jax.Array,
                  speculative: jax.Array) -> tuple[jax.Array, jax.Array, KVCache]:
  """One SpeCache step (Algorithm 3): the real tokens [B] and speculative next tokens [B] at p, p + 1 ->
  (the real token's logits [B, V], the speculative token's [B, V], cache holding only the real token).
  Row 1's attention chose and prefetched the next step's top-k in every layer."""
  logits, cache = extend_cache(Decoder(config), params, jnp.stack([tokens, speculative], axis=1), cache)
  return logits[:, 0], logits[:, 1], cache.drop_last(jnp.ones_like(tokens))


@functools.partial(jax.jit, static_argnums=0)
def predecode(config: TransformerConfig, params: dict, cache: KVCache, tokens: jax.Array) -> tuple[jax.Array, KVCache]:
  """Pre-decoding (Algorithm 2): tokens [B] attend over the low-bit cache, pick the first top-k, and give the
  logits [B, V] whose argmax is the first speculative token; their K/V are dropped (the first step rewrites them)."""
  logits, cache = extend_cache(Decoder(config), params, tokens[:, None], cache)
  return logits[:, 0], cache.drop_last(jnp.ones_like(tokens))


@functools.partial(jax.jit, static_argnums=0)
def cached_step(config: TransformerConfig, params: dict, cache: KVCache, tokens: jax.Array) -> tuple[jax.Array, KVCache]:
  """A plain one-token step over any cache (the baselines' decode): (logits [B, V], cache)."""
  logits, cache = extend_cache(Decoder(config), params, tokens[:, None], cache)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnums=(0, 5, 6), donate_argnums=2)
def specache_decode(config: TransformerConfig, params: dict, cache: KVCache, tokens: jax.Array,
                    speculative: jax.Array, steps: int, exact: bool = False) -> tuple[jax.Array, KVCache]:
  """`steps` greedy SpeCache steps in one compiled loop, the cache donated (updated in place): from the real
  tokens [B] and first speculative tokens [B] (`predecode`'s argmax) -> (the real tokens fed at each step
  [B, steps], cache). Each step's real argmax is the next real token, its speculative argmax the next guess.
  exact: the spec's `topk_source="exact"` ablation: each step first pre-decodes its real token, whose own
  low-bit attention picks the top-k that step reads (two passes a step; the speculative pick is overwritten)."""
  def step(i, carry):
    out, cache, token, guess = carry
    if exact:
      _, cache = predecode(config, params, cache, token)
    real, spec, cache = specache_step(config, params, cache, token, guess)
    out = out.at[:, i].set(token)
    return out, cache, jnp.argmax(real, -1).astype(token.dtype), jnp.argmax(spec, -1).astype(token.dtype)

  out = jnp.zeros((tokens.shape[0], steps), tokens.dtype)
  out, cache, _, _ = jax.lax.fori_loop(0, steps, step, (out, cache, tokens, speculative))
  return out, cache


@functools.partial(jax.jit, static_argnums=(0, 4, 5), donate_argnums=2)
def specache_generate(config: TransformerConfig, params: dict, cache: KVCache, tokens: jax.Array, steps: int,
                      exact: bool = False) -> tuple[jax.Array, KVCache]:
  """Generation from the first tokens [B] after the prompt, as the paper runs it: pre-decoding (Algorithm 2)
  picks their top-k and first guess, then `specache_decode`'s loop, all in one program over the donated cache
  -> (the real tokens fed at each step [B, steps], cache)."""
  first, cache = predecode(config, params, cache, tokens)
  return specache_decode(config, params, cache, tokens, jnp.argmax(first, -1).astype(tokens.dtype), steps, exact)


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=2)
def cached_decode(config: TransformerConfig, params: dict, cache: KVCache, tokens: jax.Array,
                  steps: int) -> tuple[jax.Array, KVCache]:
  """`steps` greedy one-token steps over any cache in one compiled loop, the cache donated: the baselines'
  counterpart of `specache_decode` (same loop, one row per step) -> (tokens fed [B, steps], cache)."""
  def step(i, carry):
    out, cache, token = carry
    logits, cache = cached_step(config, params, cache, token)
    return out.at[:, i].set(token), cache, jnp.argmax(logits, -1).astype(token.dtype)

  out = jnp.zeros((tokens.shape[0], steps), tokens.dtype)
  out, cache, _ = jax.lax.fori_loop(0, steps, step, (out, cache, tokens))
  return out, cache
