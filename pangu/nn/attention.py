"""Grouped-query attention (GQA): H query heads share K key/value heads in groups of H/K.

With a KV cache (see pangu.infer.kv_cache for the layout) the layer writes its new keys and values into
preallocated slots [B, K, T_max, Dh] and attends over every slot the mask allows. Heads come before slots so
that the attention matmuls read the cache as it lies: with slots first, XLA:CPU copies every layer's whole
cache into that order on every decode step.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from pangu.models.config import TransformerConfig
from pangu.nn import init as inits
from pangu.nn import linear
from pangu.nn.norms import rms_norm
from pangu.nn.rope import apply_rope, rope_attention_factor, rope_frequencies
from pangu.parallel import rules

_MASKED = -1e30

LayerKV = tuple[jax.Array, jax.Array]  # one layer's cached (keys, values), each [B, K, T_max, Dh]


def causal_mask(q_positions: jax.Array, kv_positions: jax.Array,
                kv_valid: jax.Array | None = None) -> jax.Array:
  """[B, S, T] bool: query s sees key t iff pos(t) <= pos(s) (and key t is valid, e.g. not padding)."""
  mask = kv_positions[:, None, :] <= q_positions[:, :, None]
  if kv_valid is not None:
    mask &= kv_valid[:, None, :]
  return mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                          kv_heads_major: bool = False) -> jax.Array:
  """Reference GQA: q [B, S, H, Dh], k/v [B, T, K, Dh] ([B, K, T, Dh] with kv_heads_major, the cache's
  layout), mask [B, S, T] -> [B, S, H, Dh].

  Scores and softmax run in float32 whatever the input dtype.
  """
  b, s, h, dh = q.shape
  kv = "bktd" if kv_heads_major else "btkd"
  kv_heads = k.shape[1 if kv_heads_major else 2]
  q = q.reshape(b, s, kv_heads, h // kv_heads, dh)
  scores = jnp.einsum(f"bskgd,{kv}->bkgst", q, k, preferred_element_type=jnp.float32) * dh ** -0.5
  scores = jnp.where(mask[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  # Heads-major output, then one transpose of it: asked for [B, S, K, G, Dh] directly, XLA:CPU computes the
  # transposed product and copies all of v into [.., Dh, T] for it, on every decode step.
  out = jnp.einsum(f"bkgst,{kv}->bkgsd", probs, v).transpose(0, 3, 1, 2, 4)
  return out.reshape(b, s, h, dh)


class Attention(nn.Module):
  """Self-attention with RoPE, optional q/k/v bias (Qwen2), output bias (Llama's attention_bias) and per-head
  q/k RMSNorm (Qwen3)."""

  config: TransformerConfig
  n_heads: int
  n_kv_heads: int

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, kv_cache: LayerKV | None = None,
               cache_index: jax.Array | None = None) -> tuple[jax.Array, LayerKV | None]:
    """x [B, S, D] -> ([B, S, D], updated cache or None).

    Without a cache, mask is [B, S, S]. With one, the new keys/values go to slots
    cache_index .. cache_index + S - 1 and mask is [B, S, T_max] over the slots.
    """
    cfg = self.config
    dh = cfg.head_dim

    def param(name, shape, axes, init):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                        jnp.dtype(cfg.param_dtype)).astype(cfg.dtype)

    def project(name, heads, head_axis):
      w = linear.kernel(self, cfg, name, (cfg.d_model,), (heads, dh), (rules.EMBED,), (head_axis, rules.HEAD_DIM),
                        inits.kernel_init(cfg))
      y = linear.project(x, w, cfg)
      if cfg.attention_bias:
        y += param(f"{name}_bias", (heads, dh), (head_axis, rules.HEAD_DIM), jax.nn.initializers.zeros)
      return y

    q = project("q", self.n_heads, rules.HEADS)
    k = project("k", self.n_kv_heads, rules.KV_HEADS)
    v = project("v", self.n_kv_heads, rules.KV_HEADS)
    if cfg.qk_norm:
      ones = jax.nn.initializers.ones
      q = rms_norm(q, param("q_norm", (dh,), (rules.NORM,), ones), cfg.norm_eps)
      k = rms_norm(k, param("k_norm", (dh,), (rules.NORM,), ones), cfg.norm_eps)
    inv_freq = rope_frequencies(dh, cfg.rope_theta, cfg.rope_scaling)
    scale = rope_attention_factor(cfg.rope_scaling)
    q, k = apply_rope(q, positions, inv_freq, scale), apply_rope(k, positions, inv_freq, scale)
    q = rules.constrain(q, (rules.BATCH, rules.LENGTH, rules.ACT_HEADS, None))
    k = rules.constrain(k, (rules.BATCH, rules.LENGTH, rules.ACT_KV_HEADS, None))
    if kv_cache is not None:
      k, v = (rules.constrain(
          jax.lax.dynamic_update_slice_in_dim(cached, new.swapaxes(1, 2).astype(cached.dtype), cache_index, 2),
          (rules.BATCH, rules.ACT_KV_HEADS, rules.CACHE_LENGTH, None)) for cached, new in zip(kv_cache, (k, v)))
      kv_cache = (k, v)
    out = dot_product_attention(q, k, v, mask, kv_heads_major=kv_cache is not None)
    o = linear.kernel(self, cfg, "o", (self.n_heads, dh), (cfg.d_model,), (rules.HEADS, rules.HEAD_DIM),
                      (rules.EMBED,), inits.kernel_init(cfg, residual_output=True))
    y = linear.project(out, o, cfg, in_rank=2)
    if cfg.attention_output_bias:
      y += param("o_bias", (cfg.d_model,), (rules.EMBED,), jax.nn.initializers.zeros)
    return y, kv_cache
