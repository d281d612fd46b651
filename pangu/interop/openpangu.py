"""openPangu checkpoint formats: what their config.json fields and tensor names mean in our decoder.

Mapped from the published configuration and modeling code (read, not copied):

`PanguEmbeddedForCausalLM` (openPangu-Embedded 1B / 7B; `PanguEmbeddedConfig`, model_type `PanguEmbedded`): a
Llama decoder whose config key `bias` (default true) puts biases on q_proj, k_proj, v_proj and o_proj; the MLP
has none. Tensor names are Llama's (pangu.interop.hf). Ours: attention_bias = attention_output_bias = `bias`.

`PanguUltraMoEForCausalLM` / `OpenPanguMoEForCausalLM` (openPangu-Ultra-MoE-718B; `OpenPanguMoEConfig`):
  config.json                                    ours
  attention_q_lora_dim (null: one q_proj)        mla.q_lora_rank
  attention_kv_lora_dim                          mla.kv_lora_rank
  attention_qk_dim / attention_qk_rope_dim       mla.qk_nope_dim / mla.qk_rope_dim
  attention_v_dim                                mla.v_head_dim
  num_routed_experts (null: every layer dense)   moe.num_experts (router `sigmoid_topk`)
  num_experts_per_tok, moe_intermediate_size     moe.top_k, moe.expert_dim
  num_shared_experts (null: none)                moe.num_shared_experts (one SwiGLU of that many x expert width)
  routed_scaling_factor                          moe.routed_scaling_factor
  norm_topk_prob (must be true)                  the sigmoid scores of the K chosen experts are renormalised
  num_dense_layers                               first_k_dense
  sandwich_norm                                  norm_placement `sandwich` (else `pre`)
  intermediate_size                              d_ff (the dense layers)
  Tensors of layer i (model.layers.i.):
  self_attn.q_a_proj [Q, D], q_a_layernorm [Q], q_b_proj [H (N+P), Q]  -> attn.q_down, q_norm, q_up
  self_attn.q_proj [H (N+P), D] (no q latent)                          -> attn.q
  self_attn.kv_a_proj_with_mqa [R+P, D], kv_a_layernorm [R]            -> attn.kv_down, kv_norm
  self_attn.kv_b_proj [H (N+V), R], o_proj [D, H V]                    -> attn.kv_up, attn.o
  input_layernorm, post_attention_layernorm (+ pre_mlp_layernorm, post_mlp_layernorm with sandwich_norm)
  mlp.{gate,up,down}_proj (dense layers)                               -> mlp.*
  mlp.gate.weight [E, D], mlp.experts.j.{gate,up,down}_proj, mlp.shared_experts.{gate,up,down}_proj -> moe.*
The modeling code's RoPE pairs interleaved dims (2j, 2j + 1) of q_pe / k_pe; ours pairs the halves (j, j + P/2),
so the RoPE rows of q_b_proj (q_proj) and kv_a_proj_with_mqa are reordered on load and back on save.
The gate is sigmoid -> top-K -> divide by the K scores' sum -> x routed_scaling_factor.
Its MTP layer follows DeepSeek-V3's layout. Names from omni-ai-npu/omni-infer omni/models/pangu/
pangu_ultra_moe_mtp.py (read in the zhengjinhuan/omni-infer and mingtingwei/omni-infer copies) and vllm-project/vllm
vllm/model_executor/models/openpangu_mtp.py; the count field also from huggingface/transformers
src/transformers/models/openpangu_moe/configuration_openpangu_moe.py (whose modeling code builds no MTP layer):
  config.json                                     ours
  num_mtp_layers (omni-infer, transformers) /     mtp_layers (0 or 1; equal when both are given; both written
  num_nextn_predict_layers (vLLM)                 on save; neither given: 0, as vLLM and omni-infer read it,
                                                  and a folder holding model.layers.L tensors is then refused)
  Tensors of model.layers.L. (L = num_hidden_layers):
  enorm, hnorm [D]                                -> mtp_embed_norm, mtp_hidden_norm
  eh_proj [D, 2D] (input [enorm(emb); hnorm(h)])  -> mtp_proj [2D, D] (input [hidden; embedding]: halves swapped)
  a decoder layer's tensors (a MoE layer)         -> mtp_block (the kind of layer L - 1)
  shared_head.norm [D]                            -> mtp_head_norm
  embed_tokens [V, D], shared_head.head [V, D]    copies of model.embed_tokens / lm_head, which the MTP layer
                                                  shares: optional on load and checked equal, written on save
Forward (both codes): logits = head(shared_head.norm(layer(eh_proj([enorm(emb(t_{s+1})); hnorm(h_s)])))), h_s the
main model's last hidden state before model.norm. vLLM's DeepSeek-derived layer also zeroes the embedding at
position 0 (a serving convention); omni-infer and pangu's MTP (Decoder.mtp_logits) do not.

`PanguProMoEForCausalLM` (Pangu Pro MoE 72B; the vllm-ascend modeling code `pangu_moe.py`):
  config.json                                    ours
  num_experts, num_experts_per_tok               moe.num_experts, moe.top_k; router `moge` with num_groups =
                                                 num_experts_per_tok (the code's group-of-8 top-K: one expert,
                                                 the softmax-over-all argmax, per group of N / K experts)
  moe_intermediate_size                          moe.expert_dim
  shared_expert_intermediate_size                moe.num_shared_experts x expert_dim (must be a multiple)
  mlp_only_layers ([0, k) only)                  first_k_dense = k (dense width intermediate_size)
  q/k/v/o_proj always carry biases               attention_bias = attention_output_bias = true
  Tensors beyond Llama's: mlp.gate.weight [E, D], mlp.router_scale [1, E] (weights x scale[id], no
  renormalisation; moe.router_scale), mlp.experts.j.{gate,up,down}_proj, mlp.shared_expert.{gate,up,down}_proj.

`PanguProMoEV2ForCausalLM` (openPangu-R-72B-2512; its config.json on huggingface.co/openpangu/openPangu-R-72B-2512
keeps model_type `PanguProMoE` and V1's MoE fields, and adds qk_nope_dim 128, qk_rope_dim 64, v_channels 128,
param_sink_number 128, router_enable_expert_bias, sandwich_norm; modeling code: vllm-project/vllm
vllm/model_executor/models/openpangu.py, where it is an OpenPanguMoEModel, and omni-ai-npu/omni-infer
omni/models/pangu/pangu_pro_moe_v2/pangu_moe_v2.py) is not V1 with new names. Its attention (OpenPanguSinkAttention)
has queries and keys of qk_nope_dim + qk_rope_dim with RoPE on the qk_rope_dim dims only (interleaved pairs),
values of another width (v_channels), an RMSNorm on the keys alone (k_layernorm) and learned sink keys and values
(param_sink_number: param_sink_key / param_sink_value); its gate is a sigmoid top-K with routed_scaling_factor and
an expert bias on the choice (router_enable_expert_bias: e_score_correction_bias), not MoGE. Our GQA has none of the
four attention features and our gate no selection bias, so the architecture is refused (NOT_MAPPED says why).

Options the published code has that we do not build raise CheckpointFormatError naming the field: more than one
MTP layer (`num_mtp_layers` / `num_nextn_predict_layers` > 1) and MTP layers outside Ultra MoE, `norm_topk_prob`
false, `moe_layer_freq` != 1, `hidden_act` other than silu, Pro MoE's `mlp_only_layers` other than a prefix [0, k).
"""

from pangu.interop.tensor_layout import HEADS_IN, HEADS_OUT, SAME_1D, TRANSPOSED, Layout, LeadingOne, Permuted
from pangu.models.config import RopeScaling, TransformerConfig
from pangu.nn.mla import LatentDims
from pangu.nn.moe.config import MoEConfig

EMBEDDED, PRO_MOE, ULTRA_MOE = "pangu_embedded", "pangu_pro_moe", "pangu_ultra_moe"
ARCHITECTURES = {"PanguEmbeddedForCausalLM": EMBEDDED, "PanguProMoEForCausalLM": PRO_MOE,
                 "PanguUltraMoEForCausalLM": ULTRA_MOE, "OpenPanguMoEForCausalLM": ULTRA_MOE}
SAVED_ARCHITECTURE = {EMBEDDED: "PanguEmbeddedForCausalLM", PRO_MOE: "PanguProMoEForCausalLM",
                      ULTRA_MOE: "PanguUltraMoEForCausalLM"}
MODEL_TYPES = {EMBEDDED: "PanguEmbedded", PRO_MOE: "PanguProMoE", ULTRA_MOE: "pangu_ultra_moe"}
NOT_MAPPED = {"PanguProMoEV2ForCausalLM": (
    "its attention differs from what pangu builds: partial interleaved RoPE (qk_nope_dim, qk_rope_dim), value "
    "heads of another width (v_channels), an RMSNorm on keys alone (k_layernorm) and learned attention sinks "
    "(param_sink_number); its gate adds an expert bias to the choice (router_enable_expert_bias)")}
_MTP_FIELDS = ("num_mtp_layers", "num_nextn_predict_layers")


class UnsupportedOption(ValueError):
  """A published option our decoder does not build (hf.py turns it into a CheckpointFormatError)."""


def family_of(hf: dict) -> str | None:
  """The openPangu family of a config.json dict, None for any other architecture."""
  architectures = hf.get("architectures") or []
  for name in architectures:
    if name in NOT_MAPPED:
      raise UnsupportedOption(f"architecture {name} is not mapped: {NOT_MAPPED[name]} (supported openPangu "
                              f"architectures: {sorted(ARCHITECTURES)})")
    if name in ARCHITECTURES:
      return ARCHITECTURES[name]
  return {v: k for k, v in MODEL_TYPES.items()}.get(hf.get("model_type"))


def _mtp_layers(hf: dict) -> int:
  """The MTP layer count of a config.json: `num_mtp_layers` or `num_nextn_predict_layers` (equal when both are
  given), 0 when neither is."""
  given = {name: hf[name] for name in _MTP_FIELDS if hf.get(name) is not None}
  if len(set(given.values())) > 1:
    raise UnsupportedOption(" and ".join(f"{k}={v}" for k, v in given.items()) + " disagree")
  for name, count in given.items():
    if count not in (0, 1):
      raise UnsupportedOption(f"{name}={count} (one MTP layer is built: TransformerConfig.mtp_layers)")
  return next(iter(given.values()), 0)


def _common(hf: dict, dtype: str, theta: float, scaling: RopeScaling | None) -> dict:
  if hf.get("hidden_act", "silu") != "silu":
    raise UnsupportedOption(f"hidden_act={hf['hidden_act']!r} (only silu)")
  eos = hf.get("eos_token_id")
  return dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
              d_ff=hf["intermediate_size"], tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
              rope_theta=float(theta), rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
              dtype=dtype, param_dtype=dtype, max_position_embeddings=hf.get("max_position_embeddings"),
              bos_token_id=hf.get("bos_token_id"),
              eos_token_ids=tuple(eos if isinstance(eos, list) else () if eos is None else (eos,)))


def config_from_openpangu(hf: dict, family: str, *, dtype: str, theta: float,
                          scaling: RopeScaling | None) -> TransformerConfig:
  """Our config for an openPangu config.json (RoPE already parsed); UnsupportedOption names a field we lack."""
  base = _common(hf, dtype, theta, scaling)
  heads = hf["num_attention_heads"]
  mtp = _mtp_layers(hf)
  if mtp and family != ULTRA_MOE:
    field = next(name for name in _MTP_FIELDS if hf.get(name))
    raise UnsupportedOption(f"{field}={hf[field]}: only the Ultra MoE MTP layer is mapped")
  if family == EMBEDDED:
    bias = bool(hf.get("bias", True))
    return TransformerConfig(**base, n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                             head_dim=hf.get("head_dim"), attention_bias=bias, attention_output_bias=bias)
  if family == PRO_MOE:
    return _pro_moe_config(hf, base)
  if hf.get("moe_layer_freq", 1) != 1:
    raise UnsupportedOption(f"moe_layer_freq={hf['moe_layer_freq']} (only 1: every layer after the dense ones)")
  mla = LatentDims(q_lora_rank=hf.get("attention_q_lora_dim"), kv_lora_rank=hf["attention_kv_lora_dim"],
                   qk_nope_dim=hf["attention_qk_dim"], qk_rope_dim=hf["attention_qk_rope_dim"],
                   v_head_dim=hf["attention_v_dim"])
  moe, first_k_dense = None, 0
  if hf.get("num_routed_experts"):
    if not hf.get("norm_topk_prob", True):
      raise UnsupportedOption("norm_topk_prob=false (the gate always renormalises the chosen sigmoid scores)")
    moe = MoEConfig(num_experts=hf["num_routed_experts"], top_k=hf["num_experts_per_tok"],
                    expert_dim=hf["moe_intermediate_size"], router="sigmoid_topk",
                    num_shared_experts=hf.get("num_shared_experts") or 0,
                    routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
    first_k_dense = hf.get("num_dense_layers", 0)
  return TransformerConfig(**base, n_heads=heads, n_kv_heads=heads, head_dim=mla.qk_dim, mla=mla, moe=moe,
                           first_k_dense=first_k_dense, mtp_layers=mtp,
                           norm_placement="sandwich" if hf.get("sandwich_norm") else "pre")


def _pro_moe_config(hf: dict, base: dict) -> TransformerConfig:
  n, k, width = hf["num_experts"], hf["num_experts_per_tok"], hf["moe_intermediate_size"]
  shared = hf.get("shared_expert_intermediate_size") or 0
  if shared % width:
    raise UnsupportedOption(f"shared_expert_intermediate_size={shared} is not a multiple of moe_intermediate_size="
                            f"{width} (our shared experts have the routed width)")
  dense = sorted(hf.get("mlp_only_layers") or [])
  if dense != list(range(len(dense))):
    raise UnsupportedOption(f"mlp_only_layers={dense} (only the first k layers may be dense)")
  moe = MoEConfig(num_experts=n, top_k=k, expert_dim=width, router="moge", num_groups=k,
                  num_shared_experts=shared // width, router_scale=True)
  heads = hf["num_attention_heads"]
  return TransformerConfig(**base, n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                           attention_bias=True, attention_output_bias=True, moe=moe, first_k_dense=len(dense))


def family_for(config: TransformerConfig) -> str | None:
  """The openPangu format a config is saved in by default: Ultra MoE for MLA, Pro MoE for MoGE; None otherwise."""
  if config.mla is not None:
    return ULTRA_MOE
  return PRO_MOE if config.moe is not None and config.moe.router == "moge" else None


def config_to_openpangu(config: TransformerConfig, family: str, hf: dict) -> dict:
  """config.json of `family` from the Llama-vocabulary fields `hf` (vocab, widths, RoPE, ids) and `config`.

  Raises ValueError naming what the format cannot say.
  """
  if config.mole is not None or config.mlp_activation != "swiglu" or config.mlp_bias:
    raise ValueError("openPangu feed-forwards are SwiGLU without biases or lookup experts (mole, mlp_activation, "
                     "mlp_bias)")
  common = {k: hf[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                               "rope_theta", "rope_scaling", "tie_word_embeddings", "torch_dtype",
                               "bos_token_id", "eos_token_id") if k in hf}
  common.update(architectures=[SAVED_ARCHITECTURE[family]], model_type=MODEL_TYPES[family])
  if family == EMBEDDED:
    if config.mla is not None or config.moe is not None or config.qk_norm or config.norm_placement != "pre":
      raise ValueError("PanguEmbeddedForCausalLM is a dense pre-norm GQA decoder (no mla, moe, qk_norm or "
                       f"post-norms; norm_placement={config.norm_placement!r})")
    if config.attention_bias != config.attention_output_bias:
      raise ValueError(f"PanguEmbeddedForCausalLM's `bias` covers q/k/v and o alike, got attention_bias="
                       f"{config.attention_bias}, attention_output_bias={config.attention_output_bias}")
    return {**common, "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
            "bias": config.attention_bias}
  if family == PRO_MOE:
    return {**common, **_pro_moe_fields(config)}
  if config.mla is None:
    raise ValueError("PanguUltraMoEForCausalLM needs multi-head latent attention (config.mla)")
  moe, dims = config.moe, config.mla
  out = {**common, "attention_q_lora_dim": dims.q_lora_rank, "attention_kv_lora_dim": dims.kv_lora_rank,
         "attention_qk_dim": dims.qk_nope_dim, "attention_qk_rope_dim": dims.qk_rope_dim,
         "attention_v_dim": dims.v_head_dim, "sandwich_norm": config.norm_placement != "pre",
         "num_dense_layers": config.first_k_dense, "num_routed_experts": None,
         **{name: config.mtp_layers for name in _MTP_FIELDS}}
  if moe is not None:
    if moe.router != "sigmoid_topk" or moe.router_scale:
      raise ValueError(f"PanguUltraMoEForCausalLM's gate is sigmoid_topk without router_scale, got router="
                       f"{moe.router!r}, router_scale={moe.router_scale}")
    out.update(num_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
               moe_intermediate_size=moe.expert_dim, num_shared_experts=moe.num_shared_experts or None,
               routed_scaling_factor=moe.routed_scaling_factor, norm_topk_prob=True)
  return out


def _pro_moe_fields(config: TransformerConfig) -> dict:
  moe = config.moe
  if (moe is None or moe.router != "moge" or moe.k_per_group != 1 or not moe.router_scale or config.mla is not None
      or config.qk_norm or config.norm_placement != "pre" or not config.attention_bias
      or not config.attention_output_bias or config.head_dim * config.n_heads != config.d_model):
    raise ValueError("PanguProMoEForCausalLM is a pre-norm GQA decoder with q/k/v/o biases, head_dim = d_model / "
                     "n_heads, and MoGE routing of one expert per group with router_scale (moe.router='moge', "
                     "top_k == num_groups, router_scale=True)")
  return {"num_key_value_heads": config.n_kv_heads, "num_experts": moe.num_experts,
          "num_experts_per_tok": moe.top_k, "moe_intermediate_size": moe.expert_dim,
          "shared_expert_intermediate_size": moe.shared_dim, "mlp_only_layers": list(range(config.first_k_dense))}


def pro_moe_layer_tensors(config: TransformerConfig, i: int,
                          llama: dict[tuple[str, ...], tuple[str, Layout]]) -> dict[tuple[str, ...], tuple[str, Layout]]:
  """Our path inside layer i -> (HF name, layout): Llama's attention with biases, then the MoGE block."""
  table = dict(llama)
  if config.is_moe_layer(i):
    table[("moe", "router")] = ("mlp.gate.weight", TRANSPOSED)
    table[("moe", "router_scale")] = ("mlp.router_scale", LeadingOne())
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
      table[("moe", ours)] = (f"mlp.experts.{{expert}}.{theirs}.weight", TRANSPOSED)
      table[("moe", f"shared_{ours}")] = (f"mlp.shared_expert.{theirs}.weight", TRANSPOSED)
  return table


def _halves_from_interleaved(offset: int, width: int) -> list[int]:
  """Rows [offset, offset + width) reordered so that rotate-half pairs (j, j + width/2) are the HF pairs (2j, 2j+1)."""
  return [offset + 2 * j for j in range(width // 2)] + [offset + 2 * j + 1 for j in range(width // 2)]


def _rope_rows(config: TransformerConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(q rows, kv_down rows): the HF row each of our rows reads, RoPE dims de-interleaved."""
  dims = config.mla
  q_rows = []
  for head in range(config.n_heads):
    start = head * dims.qk_dim
    q_rows += list(range(start, start + dims.qk_nope_dim))
    q_rows += _halves_from_interleaved(start + dims.qk_nope_dim, dims.qk_rope_dim)
  kv_rows = list(range(dims.kv_lora_rank)) + _halves_from_interleaved(dims.kv_lora_rank, dims.qk_rope_dim)
  return tuple(q_rows), tuple(kv_rows)


def ultra_moe_layer_tensors(config: TransformerConfig, i: int) -> dict[tuple[str, ...], tuple[str, Layout]]:
  """Our path inside layer i -> (HF name inside model.layers.i, layout); `{expert}` marks a per-expert tensor."""
  q_rows, kv_rows = _rope_rows(config)
  table = {
      ("pre_attn_norm", "scale"): ("input_layernorm.weight", SAME_1D),
      ("attn", "q_down"): ("self_attn.q_a_proj.weight", TRANSPOSED),
      ("attn", "q_norm"): ("self_attn.q_a_layernorm.weight", SAME_1D),
      ("attn", "q_up"): ("self_attn.q_b_proj.weight", Permuted(HEADS_IN, q_rows)),
      ("attn", "q"): ("self_attn.q_proj.weight", Permuted(HEADS_IN, q_rows)),
      ("attn", "kv_down"): ("self_attn.kv_a_proj_with_mqa.weight", Permuted(TRANSPOSED, kv_rows)),
      ("attn", "kv_norm"): ("self_attn.kv_a_layernorm.weight", SAME_1D),
      ("attn", "kv_up"): ("self_attn.kv_b_proj.weight", HEADS_IN),
      ("attn", "o"): ("self_attn.o_proj.weight", HEADS_OUT),
  }
  if config.norm_placement == "pre":
    table[("pre_mlp_norm", "scale")] = ("post_attention_layernorm.weight", SAME_1D)
  else:
    table.update({("post_attn_norm", "scale"): ("post_attention_layernorm.weight", SAME_1D),
                  ("pre_mlp_norm", "scale"): ("pre_mlp_layernorm.weight", SAME_1D),
                  ("post_mlp_norm", "scale"): ("post_mlp_layernorm.weight", SAME_1D)})
  if config.is_moe_layer(i):
    table[("moe", "router")] = ("mlp.gate.weight", TRANSPOSED)
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
      table[("moe", ours)] = (f"mlp.experts.{{expert}}.{theirs}.weight", TRANSPOSED)
      table[("moe", f"shared_{ours}")] = (f"mlp.shared_experts.{theirs}.weight", TRANSPOSED)
  else:
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
      table[("mlp", ours)] = (f"mlp.{theirs}.weight", TRANSPOSED)
  return table


def ultra_moe_mtp_tensors(config: TransformerConfig) -> dict[tuple[str, ...], tuple[str, Layout]]:
  """Our MTP param path -> (full HF name, layout): the layer model.layers.L (L = n_layers), see the module doc."""
  prefix, d = f"model.layers.{config.n_layers}.", config.d_model
  hidden_first = tuple(range(d, 2 * d)) + tuple(range(d))  # our input [hidden; emb] from eh_proj's [emb; hidden]
  table = {
      ("mtp_hidden_norm", "scale"): (prefix + "hnorm.weight", SAME_1D),
      ("mtp_embed_norm", "scale"): (prefix + "enorm.weight", SAME_1D),
      ("mtp_proj",): (prefix + "eh_proj.weight", Permuted(TRANSPOSED, hidden_first, axis=1)),
      ("mtp_head_norm", "scale"): (prefix + "shared_head.norm.weight", SAME_1D),
  }
  for inner, (name, layout) in ultra_moe_layer_tensors(config, config.n_layers - 1).items():
    table[("mtp_block", *inner)] = (prefix + name, layout)
  return table


def ultra_moe_mtp_copies(config: TransformerConfig) -> dict[str, str]:
  """The MTP layer's copies of shared tensors: HF name -> the tensor it copies."""
  prefix = f"model.layers.{config.n_layers}."
  head = "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"
  return {prefix + "embed_tokens.weight": "model.embed_tokens.weight", prefix + "shared_head.head.weight": head}
