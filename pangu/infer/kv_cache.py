"""The KV cache: its contract, the preallocated dense cache, and `extend`, the model step over a cache.

Contract (what the model relies on; SpeCache's offloaded cache and quantised caches are other implementations):
  * A cache is a `KVCache`: one `LayerCache` per layer (pangu.nn.attention.LayerCache), stacked along a leading
    [L] axis for a scanned model (the layer scan slices it) or a tuple of L for an unrolled one, plus
    `next_positions` [B], the RoPE position of each row's next token.
  * A layer cache is a pytree with two methods. `write(keys, values, positions)` appends S new tokens
    (keys / values [B, S, K, Dh] after RoPE and the k-norm; positions [B, S]) after each row's written slots
    and returns the new cache: rows may hold different numbers of tokens, and layers too (token pruning keeps
    fewer tokens in later layers). `read()` returns `CachedKV`: keys / values [B, K, T, Dh] in the compute
    dtype, the position of each slot [B, T] (negative: empty or left padding) and the slots written per row
    [B]. Attention masks by those positions (causal, window) and lengths, so slots need not be in order.
  * Both run inside jit, inside the layer scan, on traced arrays: no host syncs, no data-dependent shapes.
  * Optional hooks (pangu.nn.attention.LayerCache): `observe_queries` shows a query-aware cache the queries that
    attended over `read()` (H2O); `attend` replaces `read` + attention for a cache that attention should read in
    place (SpeCache's bit-packed codes), with the same output.
  * `KVCache.drop_last(n)` forgets each row's last n[b] tokens in every layer (the rejected drafts of
    speculative decoding); the next write overwrites them.

`DenseLayerCache` is the default: preallocated slots [B, K, T_max, Dh] in the compute dtype, heads before
slots, the order the attention matmuls read, so a decode step never copies the cache (Hugging Face's order
too). Row b writes its next tokens into slots lengths[b] .. (one in-place dynamic-update-slice per row; the
decode loop donates the cache). Prompts are left-padded to a common width S: row b's first real token sits in
slot start[b] = S - len(prompt_b) at position 0, and the padding slots get negative positions.
Sharding follows the rules table: batch over the data-like axes (`activation_batch`), slots over
`cache_length` (unsplit by default), kv heads over `tensor` (`activation_kv_heads`), the layer axis
replicated, so each device holds the cache of its own rows and kv heads.

Memory: 2 * L * B * T_max * K * Dh * itemsize bytes for keys and values (see `cache_bytes`), plus one int32
position per slot and layer.

`LatentLayerCache` is the cache of multi-head latent attention (pangu.nn.mla): the model writes one latent
[B, S, 1, R + P] per token as both keys and values, and this cache stores it once, [B, 1, T_max, R + P], and
reads it back as both: L * B * T_max * (kv_lora_rank + qk_rope_dim) * itemsize bytes. `init_cache` picks it by
default for an MLA model (`default_layer_cache`); a dense cache works there too, at twice the memory.
"""

import functools
import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pangu.models.config import TransformerConfig
from pangu.models.stages import LayerStages
from pangu.models.transformer import Decoder, LayerCaches
from pangu.nn.attention import CachedKV, LayerCache
from pangu.parallel import rules

LAYER_CACHE_AXES = (rules.BATCH, rules.ACT_KV_HEADS, rules.CACHE_LENGTH, None)
SLOT_AXES = (rules.BATCH, rules.CACHE_LENGTH)


def write_rows(buffer: jax.Array, new: jax.Array, offsets: jax.Array, axis: int) -> jax.Array:
  """buffer [B, ...] with new [B, ...] written into row b at offsets[b] along `axis` (of the per-row arrays)."""
  return jax.vmap(lambda row, update, offset: jax.lax.dynamic_update_slice_in_dim(row, update, offset, axis))(
      buffer, new.astype(buffer.dtype), offsets)


@flax.struct.dataclass
class DenseLayerCache:
  """One layer's preallocated slots (see the module docstring).

  Attributes:
    keys, values: [B, K, T_max, Dh].
    positions: int32 [B, T_max], the position of the token in each slot; -1 for empty slots.
    lengths: int32 [B], slots written per row.
  """

  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  lengths: jax.Array

  @classmethod
  def empty(cls, batch: int, kv_heads: int, max_length: int, head_dim: int, dtype) -> "DenseLayerCache":
    keys, values = (rules.constrain(jnp.zeros((batch, kv_heads, max_length, head_dim), dtype), LAYER_CACHE_AXES)
                    for _ in "kv")  # two buffers, so that keys and values can each be donated
    return cls(keys=keys, values=values,
               positions=rules.constrain(jnp.full((batch, max_length), -1, jnp.int32), SLOT_AXES),
               lengths=jnp.zeros((batch,), jnp.int32))

  def write(self, keys: jax.Array, values: jax.Array, positions: jax.Array) -> "DenseLayerCache":
    keys, values = (rules.constrain(write_rows(cached, new.swapaxes(1, 2), self.lengths, 1), LAYER_CACHE_AXES)
                    for cached, new in ((self.keys, keys), (self.values, values)))
    return self.replace(keys=keys, values=values,
                        positions=rules.constrain(write_rows(self.positions, positions, self.lengths, 0), SLOT_AXES),
                        lengths=self.lengths + positions.shape[1])

  def read(self) -> CachedKV:
    return CachedKV(self.keys, self.values, self.positions, self.lengths)

  def drop_last(self, n: jax.Array) -> "DenseLayerCache":
    return self.replace(lengths=self.lengths - n)


@flax.struct.dataclass
class LatentLayerCache:
  """One layer's preallocated latent slots (MLA): keys and values are the same array, stored once.

  Attributes:
    latents: [B, 1, T_max, R + P].
    positions: int32 [B, T_max]; -1 for empty slots.
    lengths: int32 [B].
  """

  latents: jax.Array
  positions: jax.Array
  lengths: jax.Array

  @classmethod
  def empty(cls, batch: int, kv_heads: int, max_length: int, head_dim: int, dtype) -> "LatentLayerCache":
    if kv_heads != 1:
      raise ValueError(f"LatentLayerCache holds one latent per token (kv_heads=1), got kv_heads={kv_heads}")
    return cls(latents=rules.constrain(jnp.zeros((batch, 1, max_length, head_dim), dtype), LAYER_CACHE_AXES),
               positions=rules.constrain(jnp.full((batch, max_length), -1, jnp.int32), SLOT_AXES),
               lengths=jnp.zeros((batch,), jnp.int32))

  def write(self, keys: jax.Array, values: jax.Array, positions: jax.Array) -> "LatentLayerCache":
    """keys [B, S, 1, R + P] are the latents; values must be the same array (MLA writes it as both)."""
    if values is not keys:
      raise ValueError("LatentLayerCache stores one latent per token: write it as both keys and values")
    latents = rules.constrain(write_rows(self.latents, keys.swapaxes(1, 2), self.lengths, 1), LAYER_CACHE_AXES)
    return self.replace(latents=latents,
                        positions=rules.constrain(write_rows(self.positions, positions, self.lengths, 0), SLOT_AXES),
                        lengths=self.lengths + positions.shape[1])

  def read(self) -> CachedKV:
    return CachedKV(self.latents, self.latents, self.positions, self.lengths)

  def drop_last(self, n: jax.Array) -> "LatentLayerCache":
    return self.replace(lengths=self.lengths - n)


# (batch, kv_heads, max_length, head_dim, dtype) -> an empty layer cache.
LayerCacheFactory = Callable[[int, int, int, int, jnp.dtype], LayerCache]


@flax.struct.dataclass
class KVCache:
  """Every layer's cache and the position each row's next token gets.

  Attributes:
    layers: a scanned model's stacked layer caches (leading axis L) or an unrolled model's tuple of L.
    next_positions: int32 [B].
  """

  layers: LayerCaches
  next_positions: jax.Array

  @property
  def max_length(self) -> int:
    return self.read_layer(0).keys.shape[2]

  def read_layer(self, i: int) -> CachedKV:
    """Layer i's `CachedKV` (for inspection and tests; the model reads inside its layer scan)."""
    if isinstance(self.layers, tuple):
      return self.layers[i].read()
    return jax.tree.map(lambda a: a[i], self.layers).read()

  @property
  def lengths(self) -> jax.Array:
    """int32 [L, B] slots written per layer and row."""
    if isinstance(self.layers, tuple):
      return jnp.stack([layer.read().lengths for layer in self.layers])
    return self.layers.read().lengths

  def map_layers(self, fn: Callable[[LayerCache], LayerCache]) -> "KVCache":
    """Every layer cache replaced by fn(layer cache) (e.g. a dense prefill cache compressed for decoding)."""
    if isinstance(self.layers, tuple):
      return self.replace(layers=tuple(fn(layer) for layer in self.layers))
    return self.replace(layers=jax.vmap(fn)(self.layers))

  def drop_last(self, n: jax.Array) -> "KVCache":
    """Forgets the last n [B] tokens of each row, in every layer."""
    n = jnp.asarray(n, jnp.int32)
    if isinstance(self.layers, tuple):
      layers = tuple(layer.drop_last(n) for layer in self.layers)
    else:
      layers = self.layers.drop_last(n[None])
    return self.replace(layers=layers, next_positions=self.next_positions - n)


def default_layer_cache(config: TransformerConfig) -> LayerCacheFactory:
  """The cache a model gets unless told otherwise: latent slots for MLA, dense keys and values otherwise."""
  return LatentLayerCache.empty if config.mla is not None else DenseLayerCache.empty


def init_cache(config: TransformerConfig, start: jax.Array, max_length: int, *,
               layer_cache: LayerCacheFactory | None = None) -> KVCache:
  """An empty cache of `max_length` slots for len(start) rows whose real tokens begin at slot start[b]
  (left padding; zeros for none), built by `layer_cache` (None: `default_layer_cache`) for every layer, each
  with the layer's `TransformerConfig.cache_geometry`.

  Call it inside jit under a mesh and logical-axis rules to allocate it directly in its sharded layout.
  """
  start = jnp.asarray(start, jnp.int32)
  batch = start.shape[0]
  layer_cache = layer_cache or default_layer_cache(config)

  def make(i):
    kv_heads, width = config.cache_geometry(i)
    return layer_cache(batch, kv_heads, max_length, width, jnp.dtype(config.dtype))

  if config.scanned:
    layers = jax.vmap(lambda _: make(0))(jnp.arange(config.n_layers))
  else:
    layers = tuple(make(i) for i in range(config.n_layers))
  return KVCache(layers=layers, next_positions=-start)


def cache_bytes(config: TransformerConfig, batch: int, max_length: int) -> int:
  """Bytes of keys and values (MLA: of the latents, in the default `LatentLayerCache`) for `batch` rows of
  `max_length` slots."""
  per_slot = sum(math.prod(config.cache_geometry(i)) for i in range(config.n_layers))
  copies = 1 if config.mla is not None else 2
  return copies * batch * max_length * per_slot * jnp.dtype(config.dtype).itemsize


def extend_cache(model: Decoder, params: dict, tokens: jax.Array, cache: KVCache, *, last_only: bool = False,
                 stages: LayerStages | None = None, stage_params=None) -> tuple[jax.Array, KVCache]:
  """Runs tokens [B, S] after each row's cached ones, inside jit: (logits, cache with them written).

  Token s of row b gets position next_positions[b] + s. `last_only` returns only the last token's logits
  [B, 1, V]; `stages` runs the layers in stages with a hook between them (pangu.models.stages), so later
  layers cache only the tokens the hook kept (a hook used for generation must keep the last token).
  """
  s = tokens.shape[1]
  positions = cache.next_positions[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
  logits, layers, _ = model.apply({"params": params}, tokens, positions, caches=cache.layers, stages=stages,
                                  stage_params=stage_params, last_only=last_only, method=Decoder.run)
  return logits, KVCache(layers=layers, next_positions=cache.next_positions + s)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("last_only", "stages"))
def _extend(config, params, tokens, cache, *, last_only, stages, stage_params):
  return extend_cache(Decoder(config), params, tokens, cache, last_only=last_only, stages=stages,
                      stage_params=stage_params)


def extend(config: TransformerConfig, params: dict, tokens: jax.Array, cache: KVCache, *, last_only: bool = False,
           stages: LayerStages | None = None, stage_params=None) -> tuple[jax.Array, KVCache]:
  """`extend_cache`, jitted, after checking that the tokens fit: a cache never silently wraps around."""
  free = cache.max_length - int(np.max(jax.device_get(cache.lengths)))
  if tokens.shape[1] > free:
    raise ValueError(f"extend: {tokens.shape[1]} tokens do not fit a cache with {free} free slots "
                     f"(max_length {cache.max_length})")
  return _extend(config, params, tokens, cache, last_only=last_only, stages=stages, stage_params=stage_params)
