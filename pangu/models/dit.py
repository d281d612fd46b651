"""DiT: a class-conditional Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie, 2023).

Dimension letters: B batch, H/W image side, C image channels, P patch side, N tokens (H W / P^2), D model width,
F MLP width, A heads, Dh head width.

Each block (Sec. 3.2, "adaLN-Zero"):
  1. (beta1, gamma1, alpha1, beta2, gamma2, alpha2) = adaLN(silu(c)), c = timestep embedding + label embedding;
  2. x += alpha1 * proj(attention(qkv(LN(x) (1 + gamma1) + beta1)));
  3. x += alpha2 * fc2(gelu(fc1(LN(x) (1 + gamma2) + beta2))).
The adaLN linears and the final layer start at zero, so every block starts as the identity. LayerNorms have no
affine parameters. Every linear is a `pangu.nn.quantized.QuantDense`, so post-training quantisation
(pangu.compress.quant) attaches per-step tables through the `quant` collection without changing params; the
attention core is `pangu.nn.quantized.QuantAttention`: `pangu.nn.attention.dot_product_attention` with a non-causal
mask, or its matmuls on quantised inputs.

Label index `n_classes` is the null label of classifier-free guidance; training drops labels to it with
probability `label_dropout` (done by the loss, pangu.diffusion.objective).
"""

import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from pangu.config_checks import positive_ints
from pangu.nn.quantized import QuantAttention, QuantDense
from pangu.parallel import rules
from pangu_kernels.fence import cotangent_fence

# The six adaLN outputs of a block, in column order of its `adaLN` linear.
MODULATION = ("beta1", "gamma1", "alpha1", "beta2", "gamma2", "alpha2")
# Linears inside every block that post-training quantisation acts on (spec 3.1).
BLOCK_LINEARS = ("qkv", "proj", "fc1", "fc2")
# The other linears (besides every block's `adaLN`): embedders and the final layer, kept in float unless
# post-training quantisation is asked to quantise every linear.
OUTER_LINEARS = ("patch_embed", "t_embed_1", "t_embed_2", "final_adaLN", "final")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """A DiT.

  Attributes:
    image_size: H = W.
    channels: C.
    patch_size: P, divides image_size.
    d_model: D.
    depth: number of blocks.
    n_heads: A, divides D.
    mlp_ratio: F = mlp_ratio * D.
    n_classes: label classes (index n_classes is the null label).
    label_dropout: probability of the null label during training (classifier-free guidance).
    frequency_dim: width of the sinusoidal timestep features.
    act_bits: activation bits of quantised linears (used only when a `quant` collection is given).
    attention_implementation: see `pangu.nn.attention.dot_product_attention`.
  """

  image_size: int = 8
  channels: int = 1
  patch_size: int = 2
  d_model: int = 64
  depth: int = 4
  n_heads: int = 4
  mlp_ratio: int = 4
  n_classes: int = 10
  label_dropout: float = 0.1
  frequency_dim: int = 64
  act_bits: int = 8
  attention_implementation: str = "xla"

  def __post_init__(self):
    positive_ints(self, "image_size", "channels", "patch_size", "d_model", "depth", "n_heads", "mlp_ratio",
                  "n_classes", "frequency_dim", "act_bits")
    if self.image_size % self.patch_size:
      raise ValueError(f"DiTConfig.patch_size={self.patch_size} does not divide image_size={self.image_size}")
    if self.d_model % self.n_heads:
      raise ValueError(f"DiTConfig.n_heads={self.n_heads} does not divide d_model={self.d_model}")
    if self.frequency_dim % 2:
      raise ValueError(f"DiTConfig.frequency_dim={self.frequency_dim} must be even")
    if not 0.0 <= self.label_dropout < 1.0:
      raise ValueError(f"DiTConfig.label_dropout must be in [0, 1), got {self.label_dropout!r}")

  @property
  def n_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def d_ff(self) -> int:
    return self.mlp_ratio * self.d_model

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads


# Published shapes (Peebles & Xie, Table 1) at 256x256 latents (32x32x4), for parameter counting.
DIT_PRESETS = {
    "DiT-S/2": dict(d_model=384, depth=12, n_heads=6),
    "DiT-B/2": dict(d_model=768, depth=12, n_heads=12),
    "DiT-L/2": dict(d_model=1024, depth=24, n_heads=16),
    "DiT-XL/2": dict(d_model=1152, depth=28, n_heads=16),
}


def dit_preset(name: str) -> DiTConfig:
  if name not in DIT_PRESETS:
    raise ValueError(f"unknown DiT preset {name!r}; known: {sorted(DIT_PRESETS)}")
  return DiTConfig(image_size=32, channels=4, patch_size=2, n_classes=1000, frequency_dim=256, **DIT_PRESETS[name])


def dit_param_count(config: DiTConfig) -> int:
  """Closed-form parameter count (the DiT paper's model, with a learned rather than fixed position table)."""
  d, f, p2c = config.d_model, config.d_ff, config.patch_size ** 2 * config.channels
  embed = p2c * d + d + config.n_tokens * d
  conditioning = (config.frequency_dim * d + d) + (d * d + d) + (config.n_classes + 1) * d
  block = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + (d * 6 * d + 6 * d)
  final = (d * 2 * d + 2 * d) + (d * p2c + p2c)
  return embed + conditioning + config.depth * block + final


def timestep_features(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal features of (possibly fractional) timesteps t [B] -> [B, dim], as in DiT / ADM."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters (DiT's)."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: jax.Array, beta: jax.Array, gamma: jax.Array) -> jax.Array:
  """x [B, N, D] with per-sample shift beta and scale gamma [B, D]."""
  return x * (1 + gamma[:, None]) + beta[:, None]


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, N, P*P*C], tokens in row-major patch order."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: jax.Array, patch: int, side: int, channels: int) -> jax.Array:
  """[B, N, P*P*C] -> [B, H, W, C] (inverse of `patchify`)."""
  b, g = tokens.shape[0], side // patch
  x = tokens.reshape(b, g, g, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, side, side, channels)


class DiTBlock(nn.Module):
  config: DiTConfig

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array, step: jax.Array | None) -> jax.Array:
    cfg = self.config
    b, n, d = x.shape
    zeros = jax.nn.initializers.zeros
    mod = QuantDense(6 * d, rules.EMBED, rules.MLP, cfg.act_bits, kernel_init=zeros, name="adaLN")(
        jax.nn.silu(c), step)
    beta1, gamma1, alpha1, beta2, gamma2, alpha2 = jnp.split(mod, 6, axis=-1)
    h = modulate(layer_norm(x), beta1, gamma1)
    qkv = QuantDense(3 * d, rules.EMBED, rules.HEADS, cfg.act_bits, name="qkv")(h, step)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, cfg.n_heads, cfg.head_dim), 2, 0)
    attended = QuantAttention(cfg.attention_implementation, cfg.act_bits, name="attention")(q, k, v, step)
    x = x + alpha1[:, None] * QuantDense(d, rules.HEADS, rules.EMBED, cfg.act_bits, name="proj")(
        attended.reshape(b, n, d), step)
    h = modulate(layer_norm(x), beta2, gamma2)
    h = jax.nn.gelu(QuantDense(cfg.d_ff, rules.EMBED, rules.MLP, cfg.act_bits, name="fc1")(h, step),
                    approximate=True)
    return x + alpha2[:, None] * QuantDense(d, rules.MLP, rules.EMBED, cfg.act_bits, name="fc2")(h, step)


class DiT(nn.Module):
  """(images [B, H, W, C], timesteps [B], labels [B], step index or None) -> predicted noise [B, H, W, C].

  `step` is the sampler's step index; it is needed only by a quantised model whose `quant` tables are per step.
  """

  config: DiTConfig

  @nn.compact
  def __call__(self, images: jax.Array, timesteps: jax.Array, labels: jax.Array,
               step: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    chex.assert_shape(images, (None, cfg.image_size, cfg.image_size, cfg.channels))
    chex.assert_shape([timesteps, labels], (images.shape[0],))
    d = cfg.d_model
    tokens = patchify(images, cfg.patch_size)
    x = QuantDense(d, None, rules.EMBED, cfg.act_bits, name="patch_embed")(tokens, step)
    x = x + self.param("pos_embed", nn.with_logical_partitioning(jax.nn.initializers.normal(0.02),
                                                                 (None, rules.EMBED)), (cfg.n_tokens, d))
    t = timestep_features(timesteps, cfg.frequency_dim)
    # The timestep embedder is an MLP (hidden width D): its two kernels carry the MLP's logical axes.
    t = QuantDense(d, None, rules.MLP, cfg.act_bits, name="t_embed_1")(t, step)
    t = QuantDense(d, rules.MLP, rules.EMBED, cfg.act_bits, name="t_embed_2")(jax.nn.silu(t), step)
    y = nn.Embed(cfg.n_classes + 1, d, embedding_init=jax.nn.initializers.normal(0.02), name="label_embed")(labels)
    c = t + y
    # The fence keeps XLA:CPU from recomputing the residual stream's cotangent inside every consumer of it
    # (pangu_kernels.fence says why and what it saves).
    for i in range(cfg.depth):
      x = cotangent_fence(DiTBlock(cfg, name=f"block_{i}")(x, c, step))
    zeros = jax.nn.initializers.zeros
    final_mod = QuantDense(2 * d, rules.EMBED, rules.MLP, cfg.act_bits, kernel_init=zeros, name="final_adaLN")
    beta, gamma = jnp.split(final_mod(jax.nn.silu(c), step), 2, axis=-1)
    out = QuantDense(tokens.shape[-1], rules.EMBED, None, cfg.act_bits, kernel_init=zeros, name="final")(
        modulate(layer_norm(x), beta, gamma), step)
    return unpatchify(out, cfg.patch_size, cfg.image_size, cfg.channels)


def init_dit(config: DiTConfig, rng: jax.Array) -> dict:
  """Unboxed float32 params of a DiT."""
  s = config.image_size
  variables = DiT(config).init(rng, jnp.zeros((1, s, s, config.channels)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  return nn.unbox(variables["params"])
