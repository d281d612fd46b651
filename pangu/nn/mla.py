"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434, sec. 2.1), the attention of Pangu Ultra MoE.

Keys and values of all H heads are decompressed from one small latent per token, so a decode cache holds only
that latent: kv_lora_rank + qk_rope_dim numbers per token and layer instead of 2 H Dh.

Dimension letters: B batch, S queries, T cached tokens, D model width, H heads, R kv_lora_rank, Q q_lora_rank,
N qk_nope_dim, P qk_rope_dim, V v_head_dim.

Training form (what the published modeling code computes):
  1. q = q_up(rms_norm(q_down(x)))  [B, S, H, N + P]  (or one projection q(x) when q_lora_rank is None);
     its last P dims get RoPE.
  2. [c; k_rope] = kv_down(x)  [B, S, R + P]; c = rms_norm(c); k_rope gets RoPE and is shared by every head.
  3. [k_nope; v] = kv_up(c)  [B, S, H, N + V]; k = [k_nope; k_rope].
  4. softmax(q k^T / sqrt(N + P)) v, then o.
Absorbed form (decoding over a cache, the same numbers up to rounding): q_nope k_nope^T = (q_nope W_uk) c^T, so
each query head is mapped into latent space once (W_uk: the key half of kv_up) and attends to the cached
latents [c; k_rope] directly, as multi-query attention with one kv head of width R + P whose "values" are the
latents themselves; the R-wide result is mapped to V by W_uv (the value half of kv_up) before o.

Both forms go through `pangu.nn.attention.dot_product_attention`, which scales by 1/sqrt(its head width): the
queries are pre-scaled so that the effective scale is 1/sqrt(N + P), and narrower q/k or v are zero-padded to a
common width (zeros change no score and no output). The cache is any `LayerCache`: the model writes the latent
[B, S, 1, R + P] as both keys and values; `pangu.infer.kv_cache.LatentLayerCache` stores it once.
"""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from pangu.config_checks import one_of, positive_ints
from pangu.nn import linear
from pangu.nn.attention import IMPLEMENTATIONS, AttentionMask, LayerCache, dot_product_attention
from pangu.nn.linear import ProjectionConfig
from pangu.nn.norms import rms_norm
from pangu.nn.rope import RopeScaling, apply_rope, rope_attention_factor, rope_frequencies
from pangu.parallel import rules

Initializer = jax.nn.initializers.Initializer


@dataclasses.dataclass(frozen=True)
class LatentDims:
  """The widths of MLA (the `q_lora_rank`, `kv_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim` and
  `v_head_dim` of DeepSeek-V3 / openPangu Ultra MoE config.json files).

  Attributes:
    q_lora_rank: Q, the query latent; None: queries are one full projection (DeepSeek-V2-Lite).
    kv_lora_rank: R, the key/value latent (what the cache stores, with the RoPE key).
    qk_nope_dim: N, per-head query/key width without RoPE.
    qk_rope_dim: P, per-head query width with RoPE, and the width of the one RoPE key shared by all heads; even.
    v_head_dim: V, per-head value width.
  """

  q_lora_rank: int | None
  kv_lora_rank: int
  qk_nope_dim: int
  qk_rope_dim: int
  v_head_dim: int

  def __post_init__(self):
    positive_ints(self, "kv_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_head_dim")
    if self.q_lora_rank is not None:
      positive_ints(self, "q_lora_rank")
    if self.qk_rope_dim % 2:
      raise ValueError(f"LatentDims.qk_rope_dim={self.qk_rope_dim} must be even for RoPE")

  @property
  def qk_dim(self) -> int:
    return self.qk_nope_dim + self.qk_rope_dim

  @property
  def cache_width(self) -> int:
    """Numbers cached per token and layer: the latent and the shared RoPE key."""
    return self.kv_lora_rank + self.qk_rope_dim


@dataclasses.dataclass(frozen=True)
class MLAConfig:
  """One MLA layer.

  Attributes:
    d_model: D.
    n_heads: H.
    dims: the latent widths (`LatentDims`).
    rope_theta, rope_scaling: RoPE of the P rotary dims.
    norm_eps: epsilon of the two latent RMSNorms.
    implementation: see `pangu.nn.attention.dot_product_attention`.
    projection: how the kernels are stored and applied.
  """

  d_model: int
  n_heads: int
  dims: LatentDims
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-5
  implementation: str = "auto"
  projection: ProjectionConfig = ProjectionConfig()

  def __post_init__(self):
    positive_ints(self, "d_model", "n_heads")
    if not isinstance(self.dims, LatentDims):
      raise ValueError(f"MLAConfig.dims must be a LatentDims, got {self.dims!r}")
    one_of(self, "implementation", IMPLEMENTATIONS)
    for name in ("rope_theta", "norm_eps"):
      if not getattr(self, name) > 0:
        raise ValueError(f"MLAConfig.{name} must be > 0, got {getattr(self, name)!r}")


def _pad_last(x: jax.Array, width: int) -> jax.Array:
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, score_dim: int, *, kv_heads_major: bool,
            implementation: str) -> jax.Array:
  """softmax(q k^T / sqrt(score_dim)) v through the shared entry point, for q/k and v of different widths."""
  width = max(q.shape[-1], v.shape[-1])
  q = q * jnp.asarray((width / score_dim) ** 0.5, q.dtype)
  out = dot_product_attention(_pad_last(q, width), _pad_last(k, width), _pad_last(v, width), mask,
                              kv_heads_major=kv_heads_major, implementation=implementation)
  return out[..., :v.shape[-1]]


class MultiHeadLatentAttention(nn.Module):
  """MLA self-attention (see the module docstring): the training form without a cache, the absorbed form with one.

  Params (training layout): q_down [D, Q], q_norm [Q], q_up [Q, H, N + P] (or q [D, H, N + P]), kv_down
  [D, R + P], kv_norm [R], kv_up [R, H, N + V], o [H, V, D].

  Attributes:
    config: the layer's MLAConfig.
    kernel_init: initialiser of the down and up projections.
    output_init: initialiser of o (a residual-branch output).
  """

  config: MLAConfig
  kernel_init: Initializer = jax.nn.initializers.normal(0.02)
  output_init: Initializer = jax.nn.initializers.normal(0.02)

  def _kernel(self, name, in_shape, out_shape, in_axes, out_axes, init=None):
    return linear.kernel(self, self.config.projection, name, in_shape, out_shape, in_axes, out_axes,
                         init or self.kernel_init)

  def _gain(self, name: str, width: int) -> jax.Array:
    return self.param(name, nn.with_logical_partitioning(jax.nn.initializers.ones, (rules.NORM,)), (width,),
                      jnp.dtype(self.config.projection.param_dtype))

  @nn.compact
  def __call__(self, x: jax.Array, mask: AttentionMask,
               cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
    """x [B, S, D] at positions mask.q_positions -> ([B, S, D], the cache with these tokens written, or None).

    As `pangu.nn.attention.Attention`: without a cache the tokens attend to each other under `mask`; with one
    they are written to it (as latents) and attend over every cached slot in the absorbed form.
    """
    cfg, proj, dims = self.config, self.config.projection, self.config.dims
    h, r = cfg.n_heads, dims.kv_lora_rank
    chex.assert_rank(x, 3)
    chex.assert_axis_dimension(x, 2, cfg.d_model)
    positions = mask.q_positions
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    inv_freq = rope_frequencies(dims.qk_rope_dim, cfg.rope_theta, cfg.rope_scaling)
    rope = lambda t: apply_rope(t, positions, inv_freq, rope_attention_factor(cfg.rope_scaling))

    if dims.q_lora_rank is None:
      q_in, q_kernel_in, q_axes = x, (cfg.d_model,), (rules.EMBED,)
    else:
      q_down = self._kernel("q_down", (cfg.d_model,), (dims.q_lora_rank,), (rules.EMBED,), (None,))
      q_in = rms_norm(linear.project(x, q_down, proj), self._gain("q_norm", dims.q_lora_rank), cfg.norm_eps)
      q_kernel_in, q_axes = (dims.q_lora_rank,), (None,)
    q_name = "q" if dims.q_lora_rank is None else "q_up"
    q = linear.project(q_in, self._kernel(q_name, q_kernel_in, (h, dims.qk_dim), q_axes, (rules.HEADS, rules.HEAD_DIM)),
                       proj)
    q_nope, q_rope = q[..., :dims.qk_nope_dim], rope(q[..., dims.qk_nope_dim:])

    latent = linear.project(x, self._kernel("kv_down", (cfg.d_model,), (dims.cache_width,), (rules.EMBED,), (None,)),
                            proj)
    c = rms_norm(latent[..., :r], self._gain("kv_norm", r), cfg.norm_eps)
    k_rope = rope(latent[..., None, r:])  # [B, S, 1, P]
    kv_up = self._kernel("kv_up", (r,), (h, dims.qk_nope_dim + dims.v_head_dim), (None,),
                         (rules.HEADS, rules.HEAD_DIM))
    score_dim = dims.qk_dim

    if cache is None:
      kv = linear.project(c, kv_up, proj)
      k_nope, v = kv[..., :dims.qk_nope_dim], kv[..., dims.qk_nope_dim:]
      k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:3], dims.qk_rope_dim))], axis=-1)
      q = rules.constrain(jnp.concatenate([q_nope, q_rope], axis=-1),
                          (rules.BATCH, rules.LENGTH, rules.ACT_HEADS, None))
      out = _attend(q, k, v, mask, score_dim, kv_heads_major=False, implementation=cfg.implementation)
    else:
      if mask.q_segment_ids is not None:
        raise ValueError("MultiHeadLatentAttention: segment ids are not cached; attend over a cache without them")
      # kv_up as [R, H, N + V] whatever its stored layout, split into the key (W_uk) and value (W_uv) halves.
      w = linear.prepare_weight(kv_up if proj.layout == "training" else jnp.moveaxis(kv_up, -1, 0))
      w_uk, w_uv = w[..., :dims.qk_nope_dim], w[..., dims.qk_nope_dim:]
      entry = jnp.concatenate([c, k_rope[:, :, 0]], axis=-1)[:, :, None, :]  # [B, S, 1, R + P]
      cache = cache.write(entry, entry, positions)
      cached = cache.read()
      q_latent = jnp.einsum("bshn,rhn->bshr", q_nope, w_uk)
      q = jnp.concatenate([q_latent, q_rope], axis=-1)
      mask = mask.replace(q_positions=positions, kv_positions=cached.positions, kv_lengths=cached.lengths)
      out_latent = _attend(q, cached.keys, cached.values, mask, score_dim, kv_heads_major=True,
                           implementation=cfg.implementation)[..., :r]
      out = jnp.einsum("bshr,rhv->bshv", out_latent, w_uv)
    o = self._kernel("o", (h, dims.v_head_dim), (cfg.d_model,), (rules.HEADS, rules.HEAD_DIM), (rules.EMBED,),
                     self.output_init)
    return linear.project(out, o, proj, in_rank=2), cache
