"""Decoder configuration: one frozen dataclass for every dense decoder family, with presets.

Dimension letters used across the package: B batch, S sequence, T tokens, D model width, H query heads,
K kv heads, Dh head dim, F ffn width, E experts, G expert groups, V vocab, L layers.
"""

import dataclasses
from typing import Literal

from pangu.config_checks import one_of, positive_ints
from pangu.nn.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from pangu.nn.attention import AttentionConfig
from pangu.nn.init import INIT_SCHEMES, InitConfig, InitScheme
from pangu.nn.linear import DTYPES, PARAM_LAYOUTS, ParamLayout, ProjectionConfig
from pangu.nn.mla import LatentDims, MLAConfig
from pangu.nn.mlp import MLP_ACTIVATIONS, MlpActivation, MLPConfig
from pangu.nn.mole import MoLEConfig
from pangu.nn.moe.config import MoEConfig
from pangu.nn.rope import RopeScaling

NormPlacement = Literal["pre", "sandwich", "depth_scaled_sandwich"]
Remat = Literal["none", "block", "selective"]

NORM_PLACEMENTS = ("pre", "sandwich", "depth_scaled_sandwich")
REMATS = ("none", "block", "selective")

@dataclasses.dataclass(frozen=True)
class LayerShape:
  """Width of one decoder layer; structured pruning makes these differ between layers."""

  n_heads: int
  n_kv_heads: int
  d_ff: int

  def __post_init__(self):
    positive_ints(self, "n_heads", "n_kv_heads", "d_ff")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"LayerShape.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A decoder-only transformer (Llama layout) with Pangu Ultra's norm and init options.

  The fields are flat, in the vocabulary of a Hugging Face config.json, which is what checkpoints store. The
  layers never see this class: they take their own small configs (`AttentionConfig`, `MLPConfig`, `MoEConfig`,
  `MoLEConfig`, `ProjectionConfig`, `InitConfig`), which the methods below compose from these fields.

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
    rope_scaling: optional RoPE frequency scaling for long contexts (Llama 3.1, linear interpolation).
    norm_eps: RMSNorm epsilon.
    attention_bias: q/k/v projections carry a bias (Qwen2; Llama's `attention_bias` also sets the next one).
    attention_output_bias: the attention output projection `o` carries a bias.
    mlp_bias: the dense feed-forward's projections carry biases (Llama's `mlp_bias`).
    qk_norm: RMSNorm on each query and key head before RoPE (Qwen3).
    attention_implementation: `xla`, `cudnn`, `pallas` or `auto` (pangu.nn.attention.dot_product_attention).
    sliding_window: attend only to the last `sliding_window` positions; None: the whole context.
    attention_logit_softcap: cap attention scores at +-softcap with a tanh (Gemma 2); None: off.
    remat: activation rematerialisation: `none`, `block` (recompute each layer) or `selective` (keep matmul
      outputs, recompute the cheap elementwise work).
    scan_layers: scan a uniform model's layers (one compiled layer, fast compile for deep models).
    dtype: compute dtype of activations; parameters stay in `param_dtype` (fp32 masters).
    moe: the sparse feed-forward of MoE layers (top-K / group-limited MoE or MoGE); None: every layer dense.
    first_k_dense: with `moe`, layers [0, first_k_dense) keep the dense SwiGLU of width d_ff and the rest are
      sparse. A model that mixes both is unrolled, not scanned (a scan needs identical layers).
    mlp_activation: the dense feed-forward: `swiglu` (gate, up, down) or `gelu` (up, down; GPT-2 / Pythia).
    mole: lookup experts (MoLE) added to every layer's dense feed-forward, which becomes their shared FFN.
    param_layout: how projection kernels are stored: `training` ([in, out], checkpoints and the optimizer) or
      `decode` ([out, in], faster skinny matmuls on CPU; see pangu.nn.linear and
      pangu.models.param_layout.convert_param_layout).
    max_position_embeddings: the context length the model was trained for, when known (written to and read
      from Hugging Face's config.json).
    bos_token_id, eos_token_ids: the tokenizer's begin / end-of-sequence ids, when known; generation stops at
      any of `eos_token_ids`.
    mtp_layers: multi-token prediction (Pangu Ultra MoE, DeepSeek-V3): 1 adds one more decoder block that reads
      the last hidden state and the next token's embedding and predicts the token after it, sharing the
      embedding and the output head (`Decoder.mtp_logits`, the loss `pangu.train.mtp.mtp_loss`); 0: none.
    mla: multi-head latent attention (pangu.nn.mla) of these widths in every layer instead of GQA; needs
      n_kv_heads == n_heads (every head has its own key and value) and no GQA-only option (q/k/v biases,
      qk_norm, sliding window, soft-cap); head_dim is then unused.
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
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-5
  attention_bias: bool = False
  attention_output_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  attention_implementation: str = "auto"
  sliding_window: int | None = None
  attention_logit_softcap: float | None = None
  remat: Remat = "none"
  scan_layers: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  moe: MoEConfig | None = None
  first_k_dense: int = 0
  mlp_activation: MlpActivation = "swiglu"
  mole: MoLEConfig | None = None
  param_layout: ParamLayout = "training"
  max_position_embeddings: int | None = None
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  mla: LatentDims | None = None
  mtp_layers: int = 0

  def __post_init__(self):
    positive_ints(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
    if self.head_dim is None:
      if self.d_model % self.n_heads:
        raise ValueError(f"TransformerConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                         "set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    positive_ints(self, "head_dim")
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
    one_of(self, "norm_placement", NORM_PLACEMENTS)
    one_of(self, "init", INIT_SCHEMES)
    one_of(self, "remat", REMATS)
    one_of(self, "dtype", DTYPES)
    one_of(self, "param_dtype", DTYPES)
    one_of(self, "mlp_activation", MLP_ACTIVATIONS)
    one_of(self, "param_layout", PARAM_LAYOUTS)
    one_of(self, "attention_implementation", ATTENTION_IMPLEMENTATIONS)
    if self.sliding_window is not None:
      positive_ints(self, "sliding_window")
    if self.attention_logit_softcap is not None and not self.attention_logit_softcap > 0:
      raise ValueError(f"TransformerConfig.attention_logit_softcap must be > 0 or None, "
                       f"got {self.attention_logit_softcap!r}")
    if self.max_position_embeddings is not None:
      positive_ints(self, "max_position_embeddings")
    object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
    for name, ids in (("bos_token_id", () if self.bos_token_id is None else (self.bos_token_id,)),
                      ("eos_token_ids", self.eos_token_ids)):
      if any(not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"TransformerConfig.{name} must hold ints >= 0, got {getattr(self, name)!r}")
    if self.mole is not None and not isinstance(self.mole, MoLEConfig):
      raise ValueError(f"TransformerConfig.mole must be a MoLEConfig or None, got {self.mole!r}")
    if self.mole is not None and self.mole.hot_rows > self.vocab_size:
      raise ValueError(f"TransformerConfig.mole.hot_rows must be <= vocab_size={self.vocab_size}, got "
                       f"{self.mole.hot_rows}")
    if self.mole is not None and self.moe is not None:
      raise ValueError("TransformerConfig.mole and TransformerConfig.moe are exclusive: a MoLE layer's experts "
                       "are lookup experts beside a dense shared FFN")
    for name in ("rope_theta", "norm_eps", "post_gain_attn", "post_gain_mlp"):
      if not getattr(self, name) > 0:
        raise ValueError(f"TransformerConfig.{name} must be > 0, got {getattr(self, name)!r}")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f"TransformerConfig.rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
    if self.embed_init_std is not None and not self.embed_init_std > 0:
      raise ValueError(f"TransformerConfig.embed_init_std must be > 0, got {self.embed_init_std!r}")
    if self.moe is not None and not isinstance(self.moe, MoEConfig):
      raise ValueError(f"TransformerConfig.moe must be a MoEConfig or None, got {self.moe!r}")
    max_dense = 0 if self.moe is None else self.n_layers - 1
    if not isinstance(self.first_k_dense, int) or not 0 <= self.first_k_dense <= max_dense:
      raise ValueError(f"TransformerConfig.first_k_dense must be an int in [0, {max_dense}] (moe="
                       f"{'set' if self.moe else 'None'}, n_layers={self.n_layers}), got {self.first_k_dense!r}")
    if self.mla is not None:
      self._check_mla()
    if self.mtp_layers not in (0, 1) or isinstance(self.mtp_layers, bool):
      raise ValueError(f"TransformerConfig.mtp_layers must be 0 or 1 (one MTP block), got {self.mtp_layers!r}")
    if self.mtp_layers and self.mole is not None:
      raise ValueError("TransformerConfig.mtp_layers with mole is not built (the MTP block has no lookup experts)")

  def _check_mla(self):
    if not isinstance(self.mla, LatentDims):
      raise ValueError(f"TransformerConfig.mla must be a LatentDims or None, got {self.mla!r}")
    if self.n_kv_heads != self.n_heads or self.layer_shapes is not None:
      raise ValueError(f"TransformerConfig.mla needs n_kv_heads == n_heads and no layer_shapes, got n_heads="
                       f"{self.n_heads}, n_kv_heads={self.n_kv_heads}, layer_shapes={self.layer_shapes!r}")
    for name in ("attention_bias", "qk_norm", "sliding_window", "attention_logit_softcap", "attention_output_bias"):
      if getattr(self, name):
        raise ValueError(f"TransformerConfig.{name}={getattr(self, name)!r} is a GQA option; MLA (mla) has none")

  def layer(self, i: int) -> LayerShape:
    if self.layer_shapes is not None:
      return self.layer_shapes[i]
    return LayerShape(self.n_heads, self.n_kv_heads, self.d_ff)

  def is_moe_layer(self, i: int) -> bool:
    """Whether layer i runs the sparse feed-forward `moe` instead of the dense SwiGLU."""
    return self.moe is not None and i >= self.first_k_dense

  @property
  def projection(self) -> ProjectionConfig:
    return ProjectionConfig(self.param_layout, self.dtype, self.param_dtype)

  @property
  def init_config(self) -> InitConfig:
    return InitConfig(self.init, self.d_model, self.n_layers, self.embed_init_std)

  def attention_config(self, i: int) -> AttentionConfig:
    """Layer i's attention."""
    shape = self.layer(i)
    return AttentionConfig(
        self.d_model, shape.n_heads, shape.n_kv_heads, self.head_dim, rope_theta=self.rope_theta,
        rope_scaling=self.rope_scaling, qk_norm=self.qk_norm, norm_eps=self.norm_eps, qkv_bias=self.attention_bias,
        output_bias=self.attention_output_bias, sliding_window=self.sliding_window,
        logit_softcap=self.attention_logit_softcap, implementation=self.attention_implementation,
        projection=self.projection)

  def mla_config(self, i: int) -> MLAConfig:
    """Layer i's latent attention (with `mla`)."""
    return MLAConfig(self.d_model, self.layer(i).n_heads, self.mla, rope_theta=self.rope_theta,
                     rope_scaling=self.rope_scaling, norm_eps=self.norm_eps,
                     implementation=self.attention_implementation, projection=self.projection)

  def cache_geometry(self, i: int) -> tuple[int, int]:
    """(kv heads, width) of what layer i caches per token: K keys / values of Dh, or MLA's one latent."""
    if self.mla is not None:
      return 1, self.mla.cache_width
    return self.layer(i).n_kv_heads, self.head_dim

  def mlp_config(self, i: int) -> MLPConfig:
    """Layer i's dense feed-forward (the shared FFN of a MoLE layer)."""
    return MLPConfig(self.d_model, self.layer(i).d_ff, self.mlp_activation, self.mlp_bias, self.projection)

  @property
  def is_uniform(self) -> bool:
    same_shapes = self.layer_shapes is None or len(set(self.layer_shapes)) == 1
    return same_shapes and self.first_k_dense == 0

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
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if d.get("moe") is not None:
      d["moe"] = MoEConfig(**d["moe"])
    if d.get("mole") is not None:
      d["mole"] = MoLEConfig(**d["mole"])
    if d.get("mla") is not None:
      d["mla"] = LatentDims(**d["mla"])
    return cls(**d)
