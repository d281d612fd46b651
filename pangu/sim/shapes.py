"""Model shapes as the simulator sees them: widths, depths and the parameter groups that shard differently.

A `ModelShape` is built from a `TransformerConfig` (dense, MoE or MoGE through its `MoEConfig`) with
`from_config`, or written out for models our decoder cannot express: Pangu Ultra MoE 718B uses MLA-style
low-rank attention (arXiv 2505.04519; shape from the `OpenPanguMoEConfig` defaults).

Dimension letters: D model width, H query heads, K kv heads, Dh head dim, F ffn width, N experts, V vocab,
L layers.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from pangu.config_checks import positive_ints
from pangu.models.config import TransformerConfig
from pangu.nn.moe.config import MoEConfig


@dataclasses.dataclass(frozen=True)
class GQA:
  """Grouped-query attention: H query heads share K key/value heads of width Dh.

  Attributes:
    n_heads: H.
    n_kv_heads: K; must divide H.
    head_dim: Dh.
    bias: q/k/v projections carry a bias (Pangu Pro MoE, Qwen2).
    qk_norm: a per-head RMSNorm gain on queries and keys (Qwen3).
  """

  n_heads: int
  n_kv_heads: int
  head_dim: int
  bias: bool = False
  qk_norm: bool = False

  def __post_init__(self):
    positive_ints(self, "n_heads", "n_kv_heads", "head_dim")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"GQA.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")

  def tensor_params(self, d: int) -> int:
    """Parameters split over tensor parallelism (by head): q, k, v, o and the q/k/v biases."""
    h, k, dh = self.n_heads, self.n_kv_heads, self.head_dim
    return d * (h + 2 * k) * dh + h * dh * d + (self.bias and (h + 2 * k) * dh)

  def replicated_params(self, d: int) -> int:
    """Parameters every tensor-parallel rank holds whole: the q/k norm gains."""
    return 2 * self.head_dim if self.qk_norm else 0

  def kv_cache_width(self) -> int:
    """Cached numbers per token and layer: keys and values of every kv head."""
    return 2 * self.n_kv_heads * self.head_dim


@dataclasses.dataclass(frozen=True)
class MLA:
  """Multi-head latent attention (DeepSeek-V2 style): low-rank query and key/value paths, a small RoPE part.

  Parameters per layer (standard low-rank MLA, the spec's reading of the `OpenPanguMoEConfig` fields):
  D·q_lora + q_lora·H·(nope + rope) for queries, D·(kv_lora + rope) + kv_lora·H·(nope + v) for keys and
  values, H·v·D for the output, plus the two latent norm gains. The down projections act on the whole
  token and stay replicated over tensor parallelism; the per-head up and output projections split by head.

  Attributes:
    n_heads: H.
    q_lora_rank, kv_lora_rank: widths of the query and key/value latents.
    qk_nope_dim, qk_rope_dim: per-head query/key width without and with RoPE.
    v_head_dim: per-head value width.
  """

  n_heads: int
  q_lora_rank: int
  kv_lora_rank: int
  qk_nope_dim: int
  qk_rope_dim: int
  v_head_dim: int

  def __post_init__(self):
    positive_ints(self, "n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_head_dim")

  @property
  def n_kv_heads(self) -> int:
    """Every head has its own key and value after the up projection."""
    return self.n_heads

  def tensor_params(self, d: int) -> int:
    h = self.n_heads
    return (self.q_lora_rank * h * (self.qk_nope_dim + self.qk_rope_dim)
            + self.kv_lora_rank * h * (self.qk_nope_dim + self.v_head_dim) + h * self.v_head_dim * d)

  def replicated_params(self, d: int) -> int:
    return d * self.q_lora_rank + d * (self.kv_lora_rank + self.qk_rope_dim) + self.q_lora_rank + self.kv_lora_rank

  def kv_cache_width(self) -> int:
    """Cached numbers per token and layer: the key/value latent and the shared RoPE key."""
    return self.kv_lora_rank + self.qk_rope_dim


Attention = GQA | MLA


class ParamGroups(NamedTuple):
  """Parameter counts by how they shard: over tensor parallelism, replicated over it, routed experts."""

  tensor: int
  replicated: int
  experts: int

  @property
  def total(self) -> int:
    return self.tensor + self.replicated + self.experts

  def __add__(self, other: ParamGroups) -> ParamGroups:  # type: ignore[override]
    return ParamGroups(*(a + b for a, b in zip(self, other)))

  def __mul__(self, factor: int) -> ParamGroups:  # type: ignore[override]
    return ParamGroups(*(a * factor for a in self))


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """A decoder as a list of layer shapes; enough to count its parameters, FLOPs, bytes and memory.

  Attributes:
    name: label for tables.
    vocab_size: V.
    d_model: D.
    n_layers: L, decoder layers (the MTP layers not included).
    attention: GQA or MLA, the same in every layer.
    d_ff: F of the dense SwiGLU (the dense layers of a MoE model).
    moe: the sparse feed-forward of MoE layers (pangu.nn.moe.MoEConfig), or None for a dense model.
    first_k_dense: with `moe`, layers [0, first_k_dense) are dense.
    mtp_layers: multi-token-prediction modules (one MoE layer, a 2D -> D projection and three norms each).
      They are trained, so they cost time and memory, but they are left out of `param_count` (Ultra MoE spec).
    norms_per_layer: RMSNorm gains per layer: 2 (pre-norm) or 4 (sandwich / DSSN).
    tie_embeddings: the output projection reuses the embedding.
  """

  name: str
  vocab_size: int
  d_model: int
  n_layers: int
  attention: Attention
  d_ff: int
  moe: MoEConfig | None = None
  first_k_dense: int = 0
  mtp_layers: int = 0
  norms_per_layer: int = 2
  tie_embeddings: bool = False

  def __post_init__(self):
    positive_ints(self, "vocab_size", "d_model", "n_layers", "d_ff")
    if not isinstance(self.attention, (GQA, MLA)):
      raise ValueError(f"ModelShape.attention must be a GQA or MLA, got {self.attention!r}")
    if self.moe is not None and not isinstance(self.moe, MoEConfig):
      raise ValueError(f"ModelShape.moe must be a MoEConfig or None, got {self.moe!r}")
    max_dense = 0 if self.moe is None else self.n_layers - 1
    if not isinstance(self.first_k_dense, int) or not 0 <= self.first_k_dense <= max_dense:
      raise ValueError(f"ModelShape.first_k_dense must be an int in [0, {max_dense}], got {self.first_k_dense!r}")
    if not isinstance(self.mtp_layers, int) or self.mtp_layers < 0:
      raise ValueError(f"ModelShape.mtp_layers must be an int >= 0, got {self.mtp_layers!r}")
    if self.mtp_layers and self.moe is None:
      raise ValueError("ModelShape.mtp_layers needs a MoE model (each MTP module is one MoE layer)")
    if self.norms_per_layer not in (2, 4):
      raise ValueError(f"ModelShape.norms_per_layer must be 2 or 4, got {self.norms_per_layer!r}")

  @property
  def n_moe_layers(self) -> int:
    return 0 if self.moe is None else self.n_layers - self.first_k_dense

  @property
  def n_dense_layers(self) -> int:
    return self.n_layers - self.n_moe_layers

  def layer_kinds(self) -> tuple[str, ...]:
    """Kind of every trained layer in order, MTP modules last: "dense" or "moe"."""
    return ("dense",) * self.n_dense_layers + ("moe",) * (self.n_moe_layers + self.mtp_layers)

  def ffn_params(self, kind: str) -> ParamGroups:
    """Feed-forward parameters of one layer of `kind`."""
    d = self.d_model
    if kind == "dense":
      return ParamGroups(tensor=3 * d * self.d_ff, replicated=0, experts=0)
    moe = self.moe
    router = d * moe.num_experts + (moe.num_experts if moe.router_scale else 0)
    return ParamGroups(tensor=3 * d * moe.shared_dim, replicated=router,
                       experts=3 * d * moe.expert_dim * moe.num_experts)

  def layer_params(self, kind: str) -> ParamGroups:
    """One decoder layer: attention, feed-forward and norm gains."""
    d, attn = self.d_model, self.attention
    attention = ParamGroups(attn.tensor_params(d), attn.replicated_params(d) + self.norms_per_layer * d, 0)
    return attention + self.ffn_params(kind)

  def mtp_projection_params(self) -> ParamGroups:
    """What an MTP module adds to its MoE layer: the 2D -> D projection of [embedding; hidden] and three norms
    (embedding, hidden and output: DeepSeek-V3's enorm, hnorm and shared_head.norm)."""
    return ParamGroups(tensor=2 * self.d_model * self.d_model, replicated=3 * self.d_model, experts=0)

  def embedding_params(self) -> ParamGroups:
    """Input embedding, the untied output projection and the final norm."""
    tables = (1 if self.tie_embeddings else 2) * self.vocab_size * self.d_model
    return ParamGroups(tensor=tables, replicated=self.d_model, experts=0)

  def param_count(self) -> int:
    """Every parameter of the model, MTP modules excluded."""
    layers = sum(self.layer_params(kind).total for kind in self.layer_kinds()[:self.n_layers])
    return layers + self.embedding_params().total

  def active_param_count(self) -> int:
    """Parameters one token uses: all but the N − K routed experts it skips in every MoE layer."""
    if self.moe is None:
      return self.param_count()
    skipped = (self.moe.num_experts - self.moe.top_k) * 3 * self.d_model * self.moe.expert_dim
    return self.param_count() - skipped * self.n_moe_layers

  def replace(self, **changes) -> ModelShape:
    return dataclasses.replace(self, **changes)


def from_config(config: TransformerConfig, name: str = "model") -> ModelShape:
  """The shape of one of our decoders; per-layer widths after pruning are not supported (uniform layers only)."""
  if config.layer_shapes is not None and len(set(config.layer_shapes)) > 1:
    raise ValueError("from_config: the simulator models uniform layers; this config has per-layer shapes "
                     f"{set(config.layer_shapes)}")
  layer = config.layer(0)
  if config.mla is not None:
    dims = config.mla
    if dims.q_lora_rank is None:
      raise ValueError("from_config: the simulator's MLA has a query latent; this config has q_lora_rank=None")
    attention = MLA(layer.n_heads, dims.q_lora_rank, dims.kv_lora_rank, dims.qk_nope_dim, dims.qk_rope_dim,
                    dims.v_head_dim)
  else:
    attention = GQA(layer.n_heads, layer.n_kv_heads, config.head_dim, bias=config.attention_bias,
                    qk_norm=config.qk_norm)
  return ModelShape(
      name=name,
      vocab_size=config.vocab_size,
      d_model=config.d_model,
      n_layers=config.n_layers,
      attention=attention,
      d_ff=layer.d_ff,
      moe=config.moe,
      first_k_dense=config.first_k_dense,
      mtp_layers=config.mtp_layers,
      norms_per_layer=2 if config.norm_placement == "pre" else 4,
      tie_embeddings=config.tie_embeddings,
  )


def ultra_moe_718b() -> ModelShape:
  """Pangu Ultra MoE 718B (arXiv 2505.04519; `OpenPanguMoEConfig` defaults, confirmed).

  61 layers (the first 3 dense, FFN 18,432) + 1 MTP layer; 256 routed experts of width 2,048 and one shared
  expert, top-8; MLA with 128 heads (q_lora 1536, kv_lora 512, nope 128, rope 64, v 128); sandwich norm (DSSN);
  vocab 153,600, hidden 7,680, untied embeddings. The router's scoring function is unconfirmed: plain softmax
  top-8 (ours).
  """
  moe = MoEConfig(num_experts=256, top_k=8, expert_dim=2048, router="topk", num_shared_experts=1)
  return ModelShape(name="ultra-moe-718b", vocab_size=153_600, d_model=7680, n_layers=61,
                    attention=MLA(n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64,
                                  v_head_dim=128),
                    d_ff=18_432, moe=moe, first_k_dense=3, mtp_layers=1, norms_per_layer=4)


def _pro_moe_72b() -> ModelShape:
  from pangu.models.presets import pangu_pro_moe_72b
  return from_config(pangu_pro_moe_72b(), name="pro-moe-72b")


def _ultra_135b() -> ModelShape:
  from pangu.models.presets import pangu_ultra_135b
  return from_config(pangu_ultra_135b(), name="ultra-135b")


SHAPES = {"ultra-moe-718b": ultra_moe_718b, "pro-moe-72b": _pro_moe_72b, "ultra-135b": _ultra_135b}


def get_shape(name: str) -> ModelShape:
  """A named model shape: `ultra-moe-718b`, `pro-moe-72b` or `ultra-135b`."""
  if name not in SHAPES:
    raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
  return SHAPES[name]()
