"""Grouped-query attention (GQA): H query heads share K key/value heads in groups of H/K.

Two seams other papers plug into:
  * `dot_product_attention(q, k, v, mask, implementation=...)`: one entry point over several implementations
    (`xla` reference, `cudnn` through `jax.nn.dot_product_attention`, the `pallas` kernels of
    pangu_kernels.attention, `cpu` its AVX2 decode products, `auto`).
    The mask is an `AttentionMask`, a description by structure (causal, positions, segment ids, per-row KV
    lengths, sliding window), never a dense [B, S, T] array, so a flash kernel can build each block's mask
    itself. Only the reference and the decode-sized CPU path materialise it.
  * `LayerCache`: the per-layer half of a KV cache. `Attention` writes its new keys and values with
    `cache.write` and attends over `cache.read()` (or lets the cache attend: its `attend` hook); the
    implementations (the preallocated dense cache, an offloaded or quantised one) live in
    pangu.infer.kv_cache, which documents the contract.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple, Protocol

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from absl import logging

from pangu.config_checks import one_of, positive_ints
from pangu.nn import linear
from pangu.nn.linear import ProjectionConfig
from pangu.nn.norms import rms_norm
from pangu.nn.rope import RopeScaling, apply_rope, rope_attention_factor, rope_frequencies
from pangu.parallel import rules
from pangu_kernels import attention as kernel_attention
from pangu_kernels.attention import cpu as kernel_cpu

_MASKED = -1e30
IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "cpu", "auto")
Initializer = jax.nn.initializers.Initializer


@flax.struct.dataclass
class AttentionMask:
  """Which keys each query attends to, by structure. Query s of row b sees key t iff all of these hold:

    * kv_positions[b, t] >= 0 (a negative position marks a padding or empty slot);
    * t < kv_lengths[b] (slots past a row's length are not written yet, or were dropped);
    * causal: kv_positions[b, t] <= q_positions[b, s];
    * window: |q_positions[b, s] - kv_positions[b, t]| < window (a sliding window of `window` tokens);
    * q_segment_ids[b, s] == kv_segment_ids[b, t] (packed sequences).

  Positions are token positions (RoPE's), not array indices: after token pruning or in a KV cache with left
  padding they differ. Any array field may be None: positions then default to 0..S-1 / 0..T-1, and a missing
  length or segment id constrains nothing.

  Attributes:
    q_positions: int32 [B, S] or None.
    kv_positions: int32 [B, T] or None.
    kv_lengths: int32 [B] or None.
    q_segment_ids, kv_segment_ids: int32 [B, S] and [B, T], both or neither.
    causal: static.
    window: static int >= 1 or None.
  """

  q_positions: jax.Array | None = None
  kv_positions: jax.Array | None = None
  kv_lengths: jax.Array | None = None
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=True)
  window: int | None = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def self_attention(cls, positions: jax.Array, *, segment_ids: jax.Array | None = None, causal: bool = True,
                     window: int | None = None) -> "AttentionMask":
    """Tokens [B, S] at `positions` attending to each other (no cache)."""
    return cls(positions, positions, None, segment_ids, segment_ids, causal, window)

  @property
  def is_index_causal(self) -> bool:
    """Plain causal attention over positions 0..S-1 with nothing else: the case every kernel supports."""
    return (self.causal and self.q_positions is None and self.kv_positions is None and self.kv_lengths is None
            and self.q_segment_ids is None and self.window is None)

  def check(self, batch: int, q_len: int, kv_len: int) -> None:
    """Raises ValueError naming the field whose shape does not fit q [B, S] and kv [B, T]."""
    if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
      raise ValueError("AttentionMask: give both q_segment_ids and kv_segment_ids, or neither")
    if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
      raise ValueError(f"AttentionMask.window must be a positive int or None, got {self.window!r}")
    expected = {"q_positions": (batch, q_len), "kv_positions": (batch, kv_len), "kv_lengths": (batch,),
                "q_segment_ids": (batch, q_len), "kv_segment_ids": (batch, kv_len)}
    for name, shape in expected.items():
      value = getattr(self, name)
      if value is not None and value.shape != shape:
        raise ValueError(f"AttentionMask.{name} has shape {value.shape}, expected {shape}")

  def dense(self, q_len: int, kv_len: int) -> jax.Array:
    """The boolean mask [B or 1, S, T] (the reference's; kernels never build it whole)."""
    q_pos = jnp.arange(q_len)[None] if self.q_positions is None else self.q_positions
    kv_pos = jnp.arange(kv_len)[None] if self.kv_positions is None else self.kv_positions
    q_pos, kv_pos = q_pos[:, :, None], kv_pos[:, None, :]
    mask = jnp.broadcast_to(kv_pos >= 0, (kv_pos.shape[0], q_len, kv_len))
    if self.causal:
      mask = mask & (kv_pos <= q_pos)
    if self.window is not None:
      mask = mask & (jnp.abs(q_pos - kv_pos) < self.window)
    if self.kv_lengths is not None:
      mask = mask & (jnp.arange(kv_len)[None, None, :] < self.kv_lengths[:, None, None])
    if self.q_segment_ids is not None:
      mask = mask & (self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :])
    return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, kv_heads_major: bool = False,
                  logit_softcap: float | None = None) -> jax.Array:
  """The reference: q [B, S, H, Dh], k/v [B, T, K, Dh] ([B, K, T, Dh] with kv_heads_major, the cache's layout)
  -> [B, S, H, Dh]. Scores and softmax run in float32 whatever the input dtype; a query that sees no key
  (left padding) gets the mean of the values, never NaN."""
  b, s, h, dh = q.shape
  kv = "bktd" if kv_heads_major else "btkd"
  kv_heads, t = (k.shape[1], k.shape[2]) if kv_heads_major else (k.shape[2], k.shape[1])
  q = q.reshape(b, s, kv_heads, h // kv_heads, dh)
  scores = jnp.einsum(f"bskgd,{kv}->bkgst", q, k, preferred_element_type=jnp.float32) * dh ** -0.5
  if logit_softcap is not None:
    scores = logit_softcap * jnp.tanh(scores / logit_softcap)
  scores = jnp.where(mask.dense(s, t)[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  # Heads-major output, then one transpose of it: asked for [B, S, K, G, Dh] directly, XLA:CPU computes the
  # transposed product and copies all of v into [.., Dh, T] for it, on every decode step.
  out = jnp.einsum(f"bkgst,{kv}->bkgsd", probs, v).transpose(0, 3, 1, 2, 4)
  return out.reshape(b, s, h, dh)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, kv_heads_major: bool = False,
                    logit_softcap: float | None = None) -> jax.Array:
  """`jax.nn.dot_product_attention`: cuDNN's fused kernel on GPU, JAX's own XLA path elsewhere.

  Plain causal attention, per-row KV lengths and a causal window map onto its structural arguments (what
  cuDNN runs); positions and segment ids go in as a dense mask, which only the XLA path takes (see
  `cudnn_unsupported`).
  """
  del logit_softcap  # cudnn_unsupported refuses it
  if kv_heads_major:
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
  s, t = q.shape[1], k.shape[1]
  structural = (mask.q_positions is None and mask.kv_positions is None and mask.q_segment_ids is None
                and (s == t or not mask.causal))
  kwargs = {}
  if structural:
    kwargs.update(is_causal=mask.causal, key_value_seq_lengths=mask.kv_lengths)
    if mask.window is not None:
      kwargs["local_window_size"] = (mask.window - 1, 0 if mask.causal else mask.window - 1)
  else:
    kwargs["mask"] = mask.dense(s, t)[:, None]
  backend = "cudnn" if jax.default_backend() == "gpu" else None
  return jax.nn.dot_product_attention(q, k, v, implementation=backend, **kwargs)


def cudnn_unsupported(q: jax.Array, k: jax.Array, mask: AttentionMask, logit_softcap: float | None) -> str | None:
  if logit_softcap is not None:
    return "jax.nn.dot_product_attention has no logit soft-cap"
  if jax.default_backend() != "gpu":
    return None  # JAX's XLA path takes every mask
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN attention needs bfloat16 or float16 inputs, got {q.dtype}"
  if q.shape[-1] % 8 or q.shape[-1] > 128:
    return f"cuDNN attention needs a head dim that is a multiple of 8 and <= 128, got {q.shape[-1]}"
  if mask.q_positions is not None or mask.kv_positions is not None or mask.q_segment_ids is not None:
    return "cuDNN attention takes no explicit positions or segment ids"
  return None


class AttentionImplementation(NamedTuple):
  """A registered implementation: `attend(q, k, v, mask, *, kv_heads_major, logit_softcap) -> out`, and
  `unsupported(q, k, mask, logit_softcap) -> None` where it runs, or the reason it cannot."""

  attend: Callable[..., jax.Array]
  unsupported: Callable[[jax.Array, jax.Array, AttentionMask, float | None], str | None]


# A cache-layout call with at most this many queries (a decode step, or verifying a few drafts) goes to the
# split-K decode kernel; longer ones (a prefill through the cache) to flash attention, which reads the cache in place.
_DECODE_MAX_QUERIES = 8


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, kv_heads_major: bool = False,
                     logit_softcap: float | None = None) -> jax.Array:
  """pangu_kernels' Pallas kernels: `decode_attention` for few queries against the cache layout, else
  `flash_attention` (differentiable: its backward is a kernel too). Compiled on GPU; interpreted on CPU, where
  only an explicit `implementation="pallas"` gets here (`auto` never picks an interpreter)."""
  kernel_args = dict(q_positions=mask.q_positions, kv_positions=mask.kv_positions, kv_lengths=mask.kv_lengths,
                     causal=mask.causal, window=mask.window, logit_softcap=logit_softcap,
                     implementation="pallas_interpret" if jax.default_backend() == "cpu" else "pallas")
  if kv_heads_major and q.shape[1] <= _DECODE_MAX_QUERIES and mask.q_segment_ids is None:
    return kernel_attention.decode_attention(q, k, v, **kernel_args)
  return kernel_attention.flash_attention(q, k, v, segment_ids=mask.q_segment_ids, kv_segment_ids=mask.kv_segment_ids,
                                          kv_heads_major=kv_heads_major, **kernel_args)


def pallas_unsupported(q: jax.Array, k: jax.Array, mask: AttentionMask, logit_softcap: float | None) -> str | None:
  """The kernels take every mask and soft-cap; they compile on GPU for power-of-two head dims, and CPU interprets."""
  if jax.default_backend() == "cpu":
    return None
  return kernel_attention.pallas_unsupported(q.dtype, q.shape[-1])


def cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, kv_heads_major: bool = False,
                  logit_softcap: float | None = None) -> jax.Array:
  """pangu_kernels' AVX2 decode products (q . k with the mask and softmax, and p . v, each cache row read once
  for all query rows of its KV head) for a few queries against the cache layout; the reference for the rest
  (training, prefill), whose large dots XLA serves well. Forward only on the kernel path."""
  b, s, h, dh = q.shape
  if not kv_heads_major or s > _DECODE_MAX_QUERIES or mask.q_segment_ids is not None:
    return xla_attention(q, k, v, mask, kv_heads_major=kv_heads_major, logit_softcap=logit_softcap)
  kv_heads, t = k.shape[1], k.shape[2]
  g = h // kv_heads
  rows = q.reshape(b, s, kv_heads, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, s * g, dh)
  visible = jnp.repeat(mask.dense(s, t), g, axis=1)
  probs = kernel_cpu.dense_probabilities(rows * dh ** -0.5, k, visible, logit_softcap)
  out = kernel_cpu.dense_weighted_values(probs, v)
  return out.reshape(b, kv_heads, s, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, s, h, dh).astype(q.dtype)


def cpu_unsupported(q: jax.Array, k: jax.Array, mask: AttentionMask, logit_softcap: float | None) -> str | None:
  """The kernels take float32 on the CPU backend without a device mesh, where they build."""
  return kernel_cpu.unsupported(q, k)


_REGISTRY: dict[str, AttentionImplementation] = {
    "xla": AttentionImplementation(xla_attention, lambda *_: None),
    "cudnn": AttentionImplementation(cudnn_attention, cudnn_unsupported),
    "pallas": AttentionImplementation(pallas_attention, pallas_unsupported),
    "cpu": AttentionImplementation(cpu_attention, cpu_unsupported),
}
# `auto` tries these in order and takes the first that runs here (fastest first): cuDNN where it takes the mask
# (the Pallas kernels aim at >= 0.7x its speed), the Pallas kernels for what it refuses (explicit positions, segment
# ids, soft-cap, float32), then the reference. CPU: the AVX2 decode products for float32 decode steps.
_AUTO_ORDER = {"gpu": ("cudnn", "pallas", "xla"), "tpu": ("pallas", "xla"), "cpu": ("cpu", "xla")}


def register_attention_implementation(name: str, attend: Callable[..., jax.Array],
                                      unsupported: Callable[..., str | None]) -> None:
  """Replaces an implementation slot (e.g. `pallas` with another kernel); see `AttentionImplementation`."""
  if name not in IMPLEMENTATIONS or name == "auto":
    raise ValueError(f"attention implementation slots are {IMPLEMENTATIONS[:-1]}, got {name!r}")
  _REGISTRY[name] = AttentionImplementation(attend, unsupported)


@functools.cache
def _log_once(message: str) -> None:
  logging.info(message)


def resolve_implementation(implementation: str, q: jax.Array, k: jax.Array, mask: AttentionMask,
                           logit_softcap: float | None = None) -> str:
  """The implementation that will run: `auto` -> the first of the backend's order that supports the call;
  an explicit choice that cannot run raises ValueError with the reason (never computes something else)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation != "auto":
    reason = _REGISTRY[implementation].unsupported(q, k, mask, logit_softcap)
    if reason is not None:
      raise ValueError(f"attention implementation {implementation!r} cannot run this call: {reason}")
    return implementation
  for name in _AUTO_ORDER.get(jax.default_backend(), ()):
    reason = _REGISTRY[name].unsupported(q, k, mask, logit_softcap)
    if reason is None:
      return name
    _log_once(f"attention auto: not {name!r} ({reason})")
  return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                          kv_heads_major: bool = False, logit_softcap: float | None = None,
                          implementation: str = "auto") -> jax.Array:
  """Scaled dot-product GQA: q [B, S, H, Dh], k/v [B, T, K, Dh] ([B, K, T, Dh] with kv_heads_major) -> [B, S, H, Dh].

  Args:
    mask: which keys each query sees (`AttentionMask`).
    kv_heads_major: k and v are in the KV cache's [B, K, T, Dh] layout.
    logit_softcap: scores become softcap * tanh(scores / softcap) before masking (Gemma 2); None: off.
    implementation: `xla`, `cudnn`, `pallas`, `cpu` or `auto` (see `resolve_implementation`).
  """
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([k, v])
  b, s, h, dh = q.shape
  kv_heads, t = (k.shape[1], k.shape[2]) if kv_heads_major else (k.shape[2], k.shape[1])
  if k.shape[0] != b or k.shape[-1] != dh or h % kv_heads:
    raise ValueError(f"dot_product_attention: q {q.shape} does not fit k {k.shape} (kv_heads_major={kv_heads_major})")
  mask.check(b, s, t)
  name = resolve_implementation(implementation, q, k, mask, logit_softcap)
  return _REGISTRY[name].attend(q, k, v, mask, kv_heads_major=kv_heads_major, logit_softcap=logit_softcap)


class CachedKV(NamedTuple):
  """What attention reads from a layer's cache: keys / values [B, K, T, Dh] (heads before slots), the position
  of the token in each slot [B, T] (negative: empty or padding) and the slots written per row [B]."""

  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  lengths: jax.Array


class LayerCache(Protocol):
  """One layer's KV cache, as `Attention` uses it (the contract is documented in pangu.infer.kv_cache)."""

  def write(self, keys: jax.Array, values: jax.Array, positions: jax.Array) -> "LayerCache":
    """Appends keys / values [B, S, K, Dh] of tokens at positions [B, S] after each row's written slots."""
    ...

  def read(self) -> CachedKV:
    """Every slot, with the positions and lengths that mask it."""
    ...

  # Optional: `observe_queries(queries [B, S, H, Dh] after RoPE, positions [B, S]) -> LayerCache`, called after
  # `read` with the queries that attended over it. Query-aware caches use it to pick what the next step reads
  # (H2O's accumulated attention; SpeCache picks its prefetch inside `attend`); a cache without it never sees them.
  # Optional: `attend(queries [B, S, H, Dh] after RoPE, mask, logit_softcap) -> ([B, S, H, Dh], LayerCache)`,
  # called instead of `read` + attention (+ `observe_queries`), with the output of attention over `read()`: caches
  # whose storage attention should read in place (SpeCache's bit-packed codes) rather than as the dense arrays
  # `read` builds. `mask` carries the query half (q_positions, causal, window); the cache supplies its slots'
  # positions and lengths.


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """A GQA self-attention layer with RoPE.

  Attributes:
    d_model: D, input and output width.
    n_heads, n_kv_heads, head_dim: H, K and Dh; K divides H, Dh is even (RoPE pairs the two halves).
    rope_theta, rope_scaling: RoPE base frequency and optional long-context scaling.
    qk_norm: RMSNorm on each query and key head before RoPE (Qwen3), with `norm_eps`.
    qkv_bias: q/k/v projections carry a bias (Qwen2); output_bias: the output projection does (Llama).
    sliding_window: attend only to the last `sliding_window` positions (Mistral, Qwen2's SWA); None: all.
    logit_softcap: cap scores with softcap * tanh(scores / softcap) (Gemma 2); None: off.
    implementation: see `dot_product_attention`.
    projection: how the kernels are stored and applied.
  """

  d_model: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  qk_norm: bool = False
  norm_eps: float = 1e-5
  qkv_bias: bool = False
  output_bias: bool = False
  sliding_window: int | None = None
  logit_softcap: float | None = None
  implementation: str = "auto"
  projection: ProjectionConfig = ProjectionConfig()

  def __post_init__(self):
    positive_ints(self, "d_model", "n_heads", "n_kv_heads", "head_dim")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"AttentionConfig.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"AttentionConfig.head_dim={self.head_dim} must be even for RoPE")
    one_of(self, "implementation", IMPLEMENTATIONS)
    if self.sliding_window is not None:
      positive_ints(self, "sliding_window")
    for name in ("rope_theta", "norm_eps"):
      if not getattr(self, name) > 0:
        raise ValueError(f"AttentionConfig.{name} must be > 0, got {getattr(self, name)!r}")
    if self.logit_softcap is not None and not self.logit_softcap > 0:
      raise ValueError(f"AttentionConfig.logit_softcap must be > 0 or None, got {self.logit_softcap!r}")


class Attention(nn.Module):
  """Self-attention with RoPE, optional q/k/v and output biases and per-head q/k RMSNorm.

  Attributes:
    config: the layer's AttentionConfig.
    kernel_init: initialiser of q, k, v.
    output_init: initialiser of o (a residual-branch output).
  """

  config: AttentionConfig
  kernel_init: Initializer = jax.nn.initializers.normal(0.02)
  output_init: Initializer = jax.nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x: jax.Array, mask: AttentionMask,
               cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
    """x [B, S, D] at positions mask.q_positions -> ([B, S, D], the cache with these tokens written, or None).

    Without a cache the tokens attend to each other under `mask`. With one, they are written to it first and
    attend over every cached slot: only the query half of `mask` (q_positions, causal) is used, and the
    slots' positions and lengths come from the cache.
    """
    cfg, proj = self.config, self.config.projection
    dh = cfg.head_dim
    chex.assert_rank(x, 3)
    chex.assert_axis_dimension(x, 2, cfg.d_model)
    positions = mask.q_positions
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])

    def param(name, shape, axes, init):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                        jnp.dtype(proj.param_dtype)).astype(proj.dtype)

    def project(name, heads, head_axis):
      w = linear.kernel(self, proj, name, (cfg.d_model,), (heads, dh), (rules.EMBED,), (head_axis, rules.HEAD_DIM),
                        self.kernel_init)
      y = linear.project(x, w, proj)
      if cfg.qkv_bias:
        y += param(f"{name}_bias", (heads, dh), (head_axis, rules.HEAD_DIM), jax.nn.initializers.zeros)
      return y

    q = project("q", cfg.n_heads, rules.HEADS)
    k = project("k", cfg.n_kv_heads, rules.KV_HEADS)
    v = project("v", cfg.n_kv_heads, rules.KV_HEADS)
    if cfg.qk_norm:
      ones = jax.nn.initializers.ones
      q = rms_norm(q, param("q_norm", (dh,), (rules.NORM,), ones), cfg.norm_eps)
      k = rms_norm(k, param("k_norm", (dh,), (rules.NORM,), ones), cfg.norm_eps)
    inv_freq = rope_frequencies(dh, cfg.rope_theta, cfg.rope_scaling)
    scale = rope_attention_factor(cfg.rope_scaling)
    q, k = apply_rope(q, positions, inv_freq, scale), apply_rope(k, positions, inv_freq, scale)
    q = rules.constrain(q, (rules.BATCH, rules.LENGTH, rules.ACT_HEADS, None))
    k = rules.constrain(k, (rules.BATCH, rules.LENGTH, rules.ACT_KV_HEADS, None))
    mask = mask.replace(window=cfg.sliding_window)
    out = None
    if cache is not None:
      if mask.q_segment_ids is not None:
        raise ValueError("Attention: segment ids are not cached; attend over a KV cache without them")
      cache = cache.write(k, v, positions)
      attend = getattr(cache, "attend", None)  # the optional hook of caches read in place (LayerCache)
      if attend is not None:
        out, cache = attend(q, mask.replace(q_positions=positions), cfg.logit_softcap)
      else:
        cached = cache.read()
        observe = getattr(cache, "observe_queries", None)  # the optional hook of query-aware caches
        if observe is not None:
          cache = observe(q, positions)
        k, v = cached.keys, cached.values
        mask = mask.replace(q_positions=positions, kv_positions=cached.positions, kv_lengths=cached.lengths)
    if out is None:
      out = dot_product_attention(q, k, v, mask, kv_heads_major=cache is not None,
                                  logit_softcap=cfg.logit_softcap, implementation=cfg.implementation)
    # Structured pruning scores heads by their share of the output projection (pangu.compress.prune); a no-op
    # unless `intermediates` is mutable.
    self.sow("intermediates", "heads", out)
    o = linear.kernel(self, proj, "o", (cfg.n_heads, dh), (cfg.d_model,), (rules.HEADS, rules.HEAD_DIM),
                      (rules.EMBED,), self.output_init)
    y = linear.project(out, o, proj, in_rank=2)
    if cfg.output_bias:
      y += param("o_bias", (cfg.d_model,), (rules.EMBED,), jax.nn.initializers.zeros)
    return y, cache
