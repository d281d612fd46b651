"""The eviction baselines SpeCache is compared with, as layer caches of a fixed number of full-precision slots:

  * `SinkWindowLayerCache` (StreamingLLM, Xiao et al. 2023): the first `sinks` tokens plus a sliding window of
    the latest ones, the window a ring buffer.
  * `HeavyHitterLayerCache` (H2O, Zhang et al. 2023): the latest `recent` tokens plus the heavy hitters, the
    tokens with the largest attention accumulated over all queries so far; a new token evicts the lightest
    older slot. Our simplification: one kept set per layer (attention summed over heads), because a cache's
    slot positions are shared by its KV heads (`CachedKV`); the paper evicts per head.

Both start from an exact dense prefill (`from_dense`), as SpeCache does; H2O's prefill attention mass comes
from `AttentionMassRecorder`, a dense cache that sums the attention its queries paid to each slot.
"""

import flax.struct
import jax
import jax.numpy as jnp

from pangu.infer.kv_cache import DenseLayerCache, KVCache
from pangu.nn.attention import CachedKV


def _attention_probs(queries: jax.Array, q_positions: jax.Array, keys: jax.Array, kv_positions: jax.Array) -> jax.Array:
  """Causal softmax of queries [B, S, H, Dh] over keys [B, K, T, Dh] -> float32 [B, S, H, T]."""
  b, s, h, dh = queries.shape
  kv = keys.shape[1]
  scores = jnp.einsum("bskgd,bktd->bskgt", queries.reshape(b, s, kv, h // kv, dh).astype(jnp.float32),
                      keys.astype(jnp.float32)) * dh ** -0.5
  visible = (kv_positions[:, None, :] >= 0) & (kv_positions[:, None, :] <= q_positions[:, :, None])  # [B, S, T]
  scores = jnp.where(visible[:, :, None, None], scores, -1e30)
  return jax.nn.softmax(scores, axis=-1).reshape(b, s, h, -1)


@flax.struct.dataclass
class AttentionMassRecorder:
  """A dense cache that also sums, per slot, the attention all its queries (over all heads) paid to it: [B, T]."""

  dense: DenseLayerCache
  mass: jax.Array

  @classmethod
  def empty(cls, batch: int, kv_heads: int, max_length: int, head_dim: int, dtype) -> "AttentionMassRecorder":
    return cls(DenseLayerCache.empty(batch, kv_heads, max_length, head_dim, dtype),
               jnp.zeros((batch, max_length), jnp.float32))

  def write(self, keys, values, positions) -> "AttentionMassRecorder":
    return self.replace(dense=self.dense.write(keys, values, positions))

  def read(self) -> CachedKV:
    return self.dense.read()

  def observe_queries(self, queries: jax.Array, positions: jax.Array) -> "AttentionMassRecorder":
    probs = _attention_probs(queries, positions, self.dense.keys, self.dense.positions)
    return self.replace(mass=self.mass + probs.sum((1, 2)))


@flax.struct.dataclass
class SinkWindowLayerCache:
  """Attributes: keys / values [B, K, sinks + window, Dh]; positions [B, slots] (-1 empty); seen [B] tokens
  written so far; sinks, window static."""

  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  seen: jax.Array
  sinks: int = flax.struct.field(pytree_node=False)
  window: int = flax.struct.field(pytree_node=False)

  def _slot(self, index: jax.Array) -> jax.Array:
    return jnp.where(index < self.sinks, index, self.sinks + (index - self.sinks) % self.window)

  @classmethod
  def from_dense(cls, dense: DenseLayerCache, *, sinks: int, window: int) -> "SinkWindowLayerCache":
    """Keeps each row's first `sinks` and last `window` tokens of the prefilled dense cache."""
    n = dense.lengths[:, None]
    slot = jnp.arange(sinks + window)[None]
    after = slot - sinks  # ring slot j holds the latest token i >= sinks with (i - sinks) % window == j
    source = jnp.where(slot < sinks, slot, sinks + after + window * ((n - 1 - sinks - after) // window))
    valid = (slot < jnp.minimum(n, sinks)) | ((slot >= sinks) & (after < n - sinks))
    source = jnp.where(valid, source, 0)
    take = lambda a: jnp.take_along_axis(a, source[:, None, :, None], axis=2)
    return cls(take(dense.keys), take(dense.values),
               jnp.where(valid, jnp.take_along_axis(dense.positions, source, axis=1), -1), dense.lengths, sinks, window)

  def write(self, keys: jax.Array, values: jax.Array, positions: jax.Array) -> "SinkWindowLayerCache":
    if positions.shape[1] > self.window:
      raise ValueError(f"SinkWindowLayerCache.write: {positions.shape[1]} tokens exceed the window of {self.window}")
    slots = self._slot(self.seen[:, None] + jnp.arange(positions.shape[1]))  # [B, S]
    put = jax.vmap(lambda store, slot, new: store.at[:, slot].set(new.swapaxes(0, 1).astype(store.dtype)))
    return self.replace(keys=put(self.keys, slots, keys), values=put(self.values, slots, values),
                        positions=jax.vmap(lambda p, slot, new: p.at[slot].set(new))(self.positions, slots, positions),
                        seen=self.seen + positions.shape[1])

  def read(self) -> CachedKV:
    return CachedKV(self.keys, self.values, self.positions, jnp.full_like(self.seen, self.keys.shape[2]))


@flax.struct.dataclass
class HeavyHitterLayerCache:
  """Attributes: keys / values [B, K, budget, Dh]; positions [B, budget] (-1 empty); mass [B, budget] attention
  accumulated per slot; recent static (the latest tokens never evicted)."""

  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  mass: jax.Array
  recent: int = flax.struct.field(pytree_node=False)

  @classmethod
  def from_dense(cls, recorder: AttentionMassRecorder, *, budget: int, recent: int) -> "HeavyHitterLayerCache":
    """Keeps each row's `recent` latest prefill tokens and the budget - recent heaviest older ones."""
    if not 0 < recent < budget:
      raise ValueError(f"HeavyHitterLayerCache: need 0 < recent < budget, got recent={recent}, budget={budget}")
    dense = recorder.dense
    slot = jnp.arange(dense.keys.shape[2])[None]
    written = slot < dense.lengths[:, None]
    is_recent = written & (slot >= dense.lengths[:, None] - recent)
    vote = jnp.where(is_recent, jnp.inf, jnp.where(written & (dense.positions >= 0), recorder.mass, -jnp.inf))
    _, source = jax.lax.top_k(vote, budget)
    valid = jnp.take_along_axis(vote, source, axis=1) > -jnp.inf
    take = lambda a: jnp.take_along_axis(a, source[:, None, :, None], axis=2)
    return cls(take(dense.keys), take(dense.values), jnp.where(valid, jnp.take_along_axis(dense.positions, source, 1), -1),
               jnp.where(valid, jnp.take_along_axis(recorder.mass, source, 1), 0.0), recent)

  def write(self, keys: jax.Array, values: jax.Array, positions: jax.Array) -> "HeavyHitterLayerCache":
    """Each new token takes an empty slot or evicts the lightest slot outside the `recent` latest positions."""
    cache = self
    for s in range(positions.shape[1]):
      newest = positions[:, s:s + 1]
      evictable = (cache.positions < 0) | (cache.positions <= newest - cache.recent)
      cost = jnp.where(cache.positions < 0, -jnp.inf, cache.mass)
      slot = jnp.argmin(jnp.where(evictable, cost, jnp.inf), axis=1)  # [B]
      put = jax.vmap(lambda store, i, new: store.at[:, i].set(new.astype(store.dtype)))
      cache = cache.replace(keys=put(cache.keys, slot, keys[:, s]), values=put(cache.values, slot, values[:, s]),
                            positions=jax.vmap(lambda p, i, new: p.at[i].set(new))(cache.positions, slot, newest[:, 0]),
                            mass=jax.vmap(lambda m, i: m.at[i].set(0.0))(cache.mass, slot))
    return cache

  def read(self) -> CachedKV:
    return CachedKV(self.keys, self.values, self.positions, jnp.full(self.keys.shape[:1], self.keys.shape[2], jnp.int32))

  def observe_queries(self, queries: jax.Array, positions: jax.Array) -> "HeavyHitterLayerCache":
    probs = _attention_probs(queries, positions, self.keys, self.positions)
    return self.replace(mass=self.mass + probs.sum((1, 2)))


def to_sink_window(cache: KVCache, *, sinks: int, window: int) -> KVCache:
  return cache.map_layers(lambda dense: SinkWindowLayerCache.from_dense(dense, sinks=sinks, window=window))


def to_heavy_hitter(cache: KVCache, *, budget: int, recent: int) -> KVCache:
  """A prefilled `KVCache` of `AttentionMassRecorder` layers -> H2O caches of `budget` slots."""
  return cache.map_layers(lambda recorder: HeavyHitterLayerCache.from_dense(recorder, budget=budget, recent=recent))


def slot_bytes(kv_heads: int, head_dim: int, itemsize: int) -> int:
  """Device bytes per kept slot and row of an eviction cache: K and V, plus an int32 position and a float32 mass."""
  return 2 * kv_heads * head_dim * itemsize + 8
