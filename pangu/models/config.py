"""Decoder configuration: one frozen dataclass for every dense decoder family, with presets.

Dimension letters used across the package: B batch, S sequence, T tokens, D model width, H query heads,
K kv heads, Dh head dim, F ffn width, E experts, G expert groups, V vocab, L layers.
"""

import dataclasses
from typing import Literal

NormPlacement = Literal["pre", "sandwich", "depth_scaled_sandwich"]
InitScheme = Literal["tiny", "small", "normal"]
Remat = Literal["none", "block", "selective"]

NORM_PLACEMENTS = ("pre", "sandwich", "depth_scaled_sandwich")
INIT_SCHEMES = ("tiny", "small", "normal")
REMATS = ("none", "block", "selective")
DTYPES = ("float32", "bfloat16", "float16")


def _positive(obj, *names: str) -> None:
  for name in names:
    value = getattr(obj, name)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


def _choice(obj, name: str, allowed: tuple[str, ...]) -> None:
  value = getattr(obj, name)
  if value not in allowed:
    raise ValueError(f"{type(obj).__name__}.{name} must be one of {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class LayerShape:
  """Width of one decoder layer; structured pruning makes these differ between layers."""

  n_heads: int
  n_kv_heads: int
  d_ff: int

  def __post_init__(self):
    _positive(self, "n_heads", "n_kv_heads", "d_ff")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"LayerShape.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A decoder-only transformer (Llama layout) with Pangu Ultra's norm and init options.

  Attributes:
    vocab_size: V, rows of the embedding table.
    d_model: D, residual stream width.
    n_layers: L, number of decoder layers (the L in the depth-scaled gains and TinyInit).
    n_heads, n_kv_heads, d_ff: the uniform layer shape (H, K, F); `layer_shapes` overrides it per layer.
    head_dim: Dh; defaults to d_model // n_heads.
    layer_shapes: optional per-layer (heads, kv_heads, d_ff); a non-uniform model is unrolled, not scanned.
    norm_placement: `pre` (Pre-LN), `sandwich` (pre + post norms, post gains 1) or `depth_scaled_sandwich`
      (post gains c/sqrt(L), Pangu Ultra's DSSN).
    post_gain_attn, post_gain_mlp: the constants c of DSSN (paper: 0.283 and 0.432).
    init: `tiny` (TinyInit, std sqrt(1/(2 D L)) for every kernel), `small` (sqrt(2/(5D)), residual outputs
      sqrt(2/(5DL))) or `normal` (std 0.02, the Hugging Face default).
    embed_init_std: embedding std; None means the scheme's default (0.5 for tiny, as the paper).
    tie_embeddings: reuse the embedding as the output projection.
    rope_theta: RoPE base frequency.
    norm_eps: RMSNorm epsilon.
    attention_bias: q/k/v projections carry a bias (Qwen2).
    qk_norm: RMSNorm on each query and key head before RoPE (Qwen3).
    remat: activation rematerialisation: `none`, `block` (recompute each layer) or `selective` (keep matmul
      outputs, recompute the cheap elementwise work).
    scan_layers: scan a uniform model's layers (one compiled layer, fast compile for deep models).
    dtype: compute dtype of activations; parameters stay in `param_dtype` (fp32 masters).
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  head_dim: int | None = None
  layer_shapes: tuple[LayerShape, ...] | None = None
  norm_placement: NormPlacement = "pre"
  post_gain_attn: float = 0.283
  post_gain_mlp: float = 0.432
  init: InitScheme = "normal"
  embed_init_std: float | None = None
  tie_embeddings: bool = False
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  attention_bias: bool = False
  qk_norm: bool = False
  remat: Remat = "none"
  scan_layers: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
    if self.head_dim is None:
      if self.d_model % self.n_heads:
        raise ValueError(f"TransformerConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                         "set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    _positive(self, "head_dim")
    if self.head_dim % 2:
      raise ValueError(f"TransformerConfig.head_dim={self.head_dim} must be even for RoPE")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"TransformerConfig.n_heads={self.n_heads} is not divisible by "
                       f"n_kv_heads={self.n_kv_heads}")
    if self.layer_shapes is not None:
      object.__setattr__(self, "layer_shapes", tuple(self.layer_shapes))
      if len(self.layer_shapes) != self.n_layers:
        raise ValueError(f"TransformerConfig.layer_shapes has {len(self.layer_shapes)} entries, "
                         f"n_layers={self.n_layers}")
    _choice(self, "norm_placement", NORM_PLACEMENTS)
    _choice(self, "init", INIT_SCHEMES)
    _choice(self, "remat", REMATS)
    _choice(self, "dtype", DTYPES)
    _choice(self, "param_dtype", DTYPES)
    for name in ("rope_theta", "norm_eps", "post_gain_attn", "post_gain_mlp"):
      if not getattr(self, name) > 0:
        raise ValueError(f"TransformerConfig.{name} must be > 0, got {getattr(self, name)!r}")
    if self.embed_init_std is not None and not self.embed_init_std > 0:
      raise ValueError(f"TransformerConfig.embed_init_std must be > 0, got {self.embed_init_std!r}")

  def layer(self, i: int) -> LayerShape:
    if self.layer_shapes is not None:
      return self.layer_shapes[i]
    return LayerShape(self.n_heads, self.n_kv_heads, self.d_ff)

  @property
  def is_uniform(self) -> bool:
    return self.layer_shapes is None or len(set(self.layer_shapes)) == 1

  @property
  def scanned(self) -> bool:
    """Whether params are stacked over a leading `layers` axis (uniform + scan_layers)."""
    return self.scan_layers and self.is_uniform

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "TransformerConfig":
    d = dict(d)
    if d.get("layer_shapes") is not None:
      d["layer_shapes"] = tuple(LayerShape(**s) for s in d["layer_shapes"])
    return cls(**d)
