"""The KV cache: preallocated key/value slots that prefill fills and every decode step extends by one.

Layout (SpeCache and SDTP build on it):
  * One (keys, values) pair per layer, each [B, K, T_max, Dh] in the model's compute dtype: heads before
    slots, the order the attention matmuls read, so a decode step never copies the cache (Hugging Face's
    order too). A scanned (uniform) model stacks them as [L, B, K, T_max, Dh] and carries the stack through
    its layer scan; an unrolled (non-uniform, e.g. pruned) model keeps a tuple of L pairs, each with its own K_l.
  * Keys are stored after RoPE and Qwen3's k-norm, values as projected, so a cached slot is never recomputed.
  * Slots, not positions, index the T axis. Prompts are left-padded to a common length S, so every row writes
    its next token into the same slot `length` (one in-place dynamic-update-slice for the whole batch; the
    decode loop donates the cache). Row b's first
    real token sits in slot start[b] = S - len(prompt_b); the token in slot t has RoPE position
    t - start[b]. Slots before start[b] are padding and slots >= length are not written yet; both are masked.
  * Sharding follows the rules table: batch over the data-like axes (`activation_batch`), slots over
    `cache_length` (unsplit by default), kv heads over `tensor` (`activation_kv_heads`), the layer axis
    replicated, so each device holds the cache of its own rows and kv heads.

Memory: 2 * L * B * T_max * K * Dh * itemsize bytes (see `cache_bytes`).
"""

import jax
import jax.numpy as jnp

from pangu.models.config import TransformerConfig
from pangu.models.transformer import KVCache
from pangu.parallel import rules

LAYER_CACHE_AXES = (rules.BATCH, rules.ACT_KV_HEADS, rules.CACHE_LENGTH, None)


def init_cache(config: TransformerConfig, start: jax.Array, max_length: int) -> KVCache:
  """An empty cache of `max_length` slots for len(start) rows whose real tokens begin at slot start[b].

  Call it inside jit under a mesh and logical-axis rules to allocate it directly in its sharded layout.
  """
  batch = start.shape[0]

  def pair(kv_heads: int, stacked: bool):
    lead, names = ((config.n_layers,), (None, *LAYER_CACHE_AXES)) if stacked else ((), LAYER_CACHE_AXES)
    shape = (*lead, batch, kv_heads, max_length, config.head_dim)
    # Two separate buffers, so that keys and values can each be donated.
    return tuple(rules.constrain(jnp.zeros(shape, config.dtype), names) for _ in "kv")

  if config.scanned:
    layers = pair(config.layer(0).n_kv_heads, True)
  else:
    layers = tuple(pair(config.layer(i).n_kv_heads, False) for i in range(config.n_layers))
  return KVCache(layers=layers, length=jnp.zeros((), jnp.int32), start=jnp.asarray(start, jnp.int32))


def cache_bytes(config: TransformerConfig, batch: int, max_length: int) -> int:
  """Bytes of keys and values for `batch` rows of `max_length` slots."""
  per_slot = sum(config.layer(i).n_kv_heads for i in range(config.n_layers)) * config.head_dim
  return 2 * batch * max_length * per_slot * jnp.dtype(config.dtype).itemsize
