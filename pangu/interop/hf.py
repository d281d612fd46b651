"""Hugging Face checkpoints in and out: Llama, Qwen2, Qwen3 and openPangu folders (config.json + safetensors),
no torch. The openPangu formats (PanguEmbeddedForCausalLM, PanguProMoEForCausalLM, PanguUltraMoEForCausalLM) are
mapped in pangu.interop.openpangu, the Ultra MoE MTP layer (model.layers.L, L = num_hidden_layers) included; the
layouts below are shared (pangu.interop.tensor_layout).

Tensor names and layouts (HF Linear weights are [out, in]; ours put the input first and split heads):
  model.embed_tokens.weight              [V, D]       -> embedding [V, D]
  model.layers.i.input_layernorm         [D]          -> pre_attn_norm.scale
  model.layers.i.self_attn.q_proj.weight [H*Dh, D]    -> attn.q [D, H, Dh]   (k, v: K heads)
  model.layers.i.self_attn.q_proj.bias   [H*Dh]       -> attn.q_bias [H, Dh] (Qwen2)
  model.layers.i.self_attn.q_norm.weight [Dh]         -> attn.q_norm [Dh]    (Qwen3, also k_norm)
  model.layers.i.self_attn.o_proj.weight [D, H*Dh]    -> attn.o [H, Dh, D]
  model.layers.i.self_attn.o_proj.bias   [D]          -> attn.o_bias [D]     (Llama / Qwen3 attention_bias)
  model.layers.i.post_attention_layernorm [D]         -> pre_mlp_norm.scale
  model.layers.i.mlp.{gate,up}_proj.weight [F, D]     -> mlp.{gate,up} [D, F]
  model.layers.i.mlp.down_proj.weight    [D, F]       -> mlp.down [F, D]
  model.layers.i.mlp.{gate,up,down}_proj.bias         -> mlp.{gate,up,down}_bias (Llama mlp_bias)
  model.norm.weight                      [D]          -> final_norm.scale
  lm_head.weight                         [V, D]       -> lm_head [D, V] (absent when embeddings are tied)
Both sides use RoPE's rotate-half pairing (i, i + Dh/2), so q/k need no permutation. The tables are in the
`training` param layout; `save_pretrained` converts other layouts first.

Biases by family, as transformers builds them: Llama's `attention_bias` covers q, k, v and o, its `mlp_bias`
gate, up and down; Qwen2 always has q/k/v biases and nothing else; Qwen3's `attention_bias` covers q, k, v, o,
and its MLP has no bias at all. So a pruned model's recovery biases (pangu.compress.prune) save as Llama's or
Qwen3's o_proj bias (zeros for q/k/v where it had none), Llama's down_proj bias (zeros for gate/up), and a Qwen2
that gains an o_proj bias as the Llama it then is; a Qwen3 with MLP biases has no format and is refused.
config.json's max_position_embeddings, bos_token_id and eos_token_id travel in our config's fields of the
same names (eos_token_ids, a tuple).

Loading streams: each parameter is built shard by shard with `jax.make_array_from_callback`, every shard read
from the memory-mapped file with `safe_open(...).get_slice`, so the host holds one tensor's slices at a time,
never the model; a scanned leaf is preallocated as [L, ...] and filled one layer at a time (donated, in place).
Measured by experiments/hf_load_memory.py on a 286 MB float32 Llama, 8 CPU devices, fsdp=4 x tensor=2: peak
RSS rose 1.69x the checkpoint size above the JAX-started baseline, against 2.00x for reading the whole file
and then placing it. On CPU the device arrays are host memory, which is the 1x; of the rest, ~0.25x stays
after loading (the loader's compiled update programs, allocator slack: a fixed cost, not per byte) and the
remainder is transient, the host slices and mapped pages of the largest tensor (the 49 MB embedding).

Per-layer shapes of a pruned (non-uniform) model cannot be said in HF's config.json; `save_pretrained`
stores them under the extra key "pangu_layer_shapes" (a list of {"n_heads", "n_kv_heads", "d_ff"}), which
`load_pretrained` reads back. Other tools ignore the key and fail on the tensor shapes rather than run a
wrong model.
"""

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from pangu.interop import openpangu
from pangu.interop.tensor_layout import HEADS_BIAS, HEADS_IN, HEADS_OUT, SAME_1D, SAME_2D, TRANSPOSED, Layout
from pangu.models.config import LayerShape, RopeScaling, TransformerConfig
from pangu.models.param_layout import convert_param_layout
from pangu.models.transformer import LAYERS_KEY, abstract_params
from pangu.parallel import rules

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LAYER_SHAPES_KEY = "pangu_layer_shapes"
# config.json's max_position_embeddings for a model whose config does not know its context length.
DEFAULT_MAX_POSITION_EMBEDDINGS = 4096

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# Tensors some exporters add that carry nothing the model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointFormatError(ValueError):
  """A folder is not a checkpoint this module can read: unknown architecture, missing or extra tensors."""


# Our path inside one layer -> (HF name inside model.layers.i, layout).
_LAYER_TENSORS = {
    ("pre_attn_norm", "scale"): ("input_layernorm.weight", SAME_1D),
    ("attn", "q"): ("self_attn.q_proj.weight", HEADS_IN),
    ("attn", "k"): ("self_attn.k_proj.weight", HEADS_IN),
    ("attn", "v"): ("self_attn.v_proj.weight", HEADS_IN),
    ("attn", "q_bias"): ("self_attn.q_proj.bias", HEADS_BIAS),
    ("attn", "k_bias"): ("self_attn.k_proj.bias", HEADS_BIAS),
    ("attn", "v_bias"): ("self_attn.v_proj.bias", HEADS_BIAS),
    ("attn", "q_norm"): ("self_attn.q_norm.weight", SAME_1D),
    ("attn", "k_norm"): ("self_attn.k_norm.weight", SAME_1D),
    ("attn", "o"): ("self_attn.o_proj.weight", HEADS_OUT),
    ("attn", "o_bias"): ("self_attn.o_proj.bias", SAME_1D),
    ("pre_mlp_norm", "scale"): ("post_attention_layernorm.weight", SAME_1D),
    ("mlp", "gate"): ("mlp.gate_proj.weight", TRANSPOSED),
    ("mlp", "up"): ("mlp.up_proj.weight", TRANSPOSED),
    ("mlp", "down"): ("mlp.down_proj.weight", TRANSPOSED),
    ("mlp", "gate_bias"): ("mlp.gate_proj.bias", SAME_1D),
    ("mlp", "up_bias"): ("mlp.up_proj.bias", SAME_1D),
    ("mlp", "down_bias"): ("mlp.down_proj.bias", SAME_1D),
}
_TOP_TENSORS = {
    ("embedding",): ("model.embed_tokens.weight", SAME_2D),
    ("final_norm", "scale"): ("model.norm.weight", SAME_1D),
    ("lm_head",): ("lm_head.weight", TRANSPOSED),
}


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One of our param leaves and the HF tensors it is made of: one, or one per index of its leading `stack`
  axes (layers of a scanned leaf, then experts of an MoE leaf), in row-major order."""

  path: tuple[str, ...]
  hf_names: tuple[str, ...]
  layout: Layout
  shape: tuple[int, ...]  # of one HF tensor's worth of ours
  stack: tuple[int, ...] = ()


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def _layer_table(config: TransformerConfig, family: str, i: int) -> dict:
  if family == openpangu.ULTRA_MOE:
    return openpangu.ultra_moe_layer_tensors(config, i)
  if family == openpangu.PRO_MOE:
    return openpangu.pro_moe_layer_tensors(config, i, _LAYER_TENSORS)
  return _LAYER_TENSORS


def _mtp_table(config: TransformerConfig, family: str) -> dict:
  """Our MTP param path -> (full HF name, layout); only Ultra MoE folders hold an MTP layer."""
  return openpangu.ultra_moe_mtp_tensors(config) if config.mtp_layers and family == openpangu.ULTRA_MOE else {}


def _shared_copies(config: TransformerConfig, family: str) -> dict[str, str]:
  """HF tensors that copy another (the MTP layer's embedding and head): copy name -> copied name."""
  return openpangu.ultra_moe_mtp_copies(config) if _mtp_table(config, family) else {}


def _entries(config: TransformerConfig, family: str) -> list[_Entry]:
  """Every param leaf of `config`'s model with its HF names, in our tree order."""
  out = []
  mtp = _mtp_table(config, family)
  leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(config)))[0]
  for path, leaf in leaves:
    keys = _path_keys(path)
    if keys in _TOP_TENSORS:
      name, layout = _TOP_TENSORS[keys]
      out.append(_Entry(keys, (name,), layout, tuple(leaf.shape)))
      continue
    layer_key, inner = keys[0], keys[1:]
    if keys in mtp:
      (name, layout), layers, stack = mtp[keys], (None,), ()
    elif layer_key == LAYERS_KEY or layer_key.startswith("layer_"):
      layers = range(config.n_layers) if layer_key == LAYERS_KEY else (int(layer_key.removeprefix("layer_")),)
      table = _layer_table(config, family, layers[0])
      if inner not in table:
        raise CheckpointFormatError(f"parameter {'/'.join(keys)} has no {family} checkpoint counterpart")
      (name, layout), stack = table[inner], (config.n_layers,) if layer_key == LAYERS_KEY else ()
    else:
      raise CheckpointFormatError(f"parameter {'/'.join(keys)} has no {family} checkpoint counterpart")
    if "{expert}" in name:
      stack += (config.moe.num_experts,)
    experts = range(config.moe.num_experts) if "{expert}" in name else (0,)
    names = tuple(name.format(expert=j) if i is None else f"model.layers.{i}.{name.format(expert=j)}"
                  for i in layers for j in experts)
    out.append(_Entry(keys, names, layout, tuple(leaf.shape[len(stack):]), stack))
  return out


# ----------------------------------------------------------------------------------------------------------
# config.json


def _rope_from_hf(hf: dict, where: str) -> tuple[float, RopeScaling | None]:
  """Reads RoPE settings in either transformers 5 (`rope_parameters`) or 4 (`rope_theta`, `rope_scaling`).

  A yarn `attention_factor` left out is inferred as transformers does: from `mscale` / `mscale_all_dim` when
  both are given, else from `factor` (then RopeScaling's own default); a missing `factor` is
  max_position_embeddings / original_max_position_embeddings.
  """
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = params.pop("rope_theta", hf.get("rope_theta", 10_000.0))
  kind = params.pop("rope_type", params.pop("type", "default"))
  if params.pop("partial_rotary_factor", 1.0) != 1.0:
    raise CheckpointFormatError(f"{where}: partial_rotary_factor is not supported")
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, RopeScaling("linear", float(params["factor"]))
  if kind == "llama3":
    return theta, RopeScaling("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                              float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
  if kind == "yarn":
    context = int(params["original_max_position_embeddings"])
    factor = params.get("factor") or hf["max_position_embeddings"] / context
    attention_factor = params.get("attention_factor")
    if attention_factor is None and params.get("mscale") and params.get("mscale_all_dim"):

      def mscale(m: float) -> float:
        return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0

      attention_factor = mscale(params["mscale"]) / mscale(params["mscale_all_dim"])
    return theta, RopeScaling(
        "yarn", float(factor), original_max_position_embeddings=context,
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        truncate=bool(params.get("truncate", True)),
        attention_factor=None if attention_factor is None else float(attention_factor))
  raise CheckpointFormatError(f"{where}: rope type {kind!r} is not supported (supported: default, linear, llama3, "
                              "yarn)")


def checkpoint_family(hf: dict, where: str = "config.json") -> str:
  """`llama`, `qwen2`, `qwen3` (by model_type) or an openPangu family (by architecture, pangu.interop.openpangu)."""
  try:
    family = openpangu.family_of(hf)
  except openpangu.UnsupportedOption as e:
    raise CheckpointFormatError(f"{where}: {e}") from None
  family = family or hf.get("model_type")
  if family not in (*_ARCHITECTURES, *openpangu.SAVED_ARCHITECTURE):
    supported = sorted(_ARCHITECTURES.values()) + sorted(openpangu.ARCHITECTURES)
    raise CheckpointFormatError(f"{where}: unsupported architecture model_type={family!r} "
                                f"(architectures={hf.get('architectures')}); supported: {supported}")
  return family


def config_from_hf(hf: dict, *, dtype: str = "float32", where: str = "config.json") -> TransformerConfig:
  """Our config for an HF config.json dict; raises CheckpointFormatError for what our decoder cannot run."""
  family = checkpoint_family(hf, where)
  if family in openpangu.SAVED_ARCHITECTURE:
    theta, scaling = _rope_from_hf(hf, where)
    try:
      return openpangu.config_from_openpangu(hf, family, dtype=dtype, theta=theta, scaling=scaling)
    except openpangu.UnsupportedOption as e:
      raise CheckpointFormatError(f"{where}: {family} option not supported: {e}") from None
  if family not in _ARCHITECTURES:
    raise CheckpointFormatError(f"{where}: unsupported architecture model_type={family!r} "
                                f"(architectures={hf.get('architectures')}); supported: {sorted(_ARCHITECTURES)}")
  unsupported = []
  if hf.get("hidden_act", "silu") != "silu":
    unsupported.append(f"hidden_act={hf['hidden_act']!r}")
  if hf.get("use_sliding_window"):
    unsupported.append("use_sliding_window=true")
  if unsupported:
    raise CheckpointFormatError(f"{where}: {family} options not supported: {', '.join(unsupported)}")
  theta, scaling = _rope_from_hf(hf, where)
  shapes = hf.get(LAYER_SHAPES_KEY)
  # transformers' Qwen2 reads neither bias key (its q/k/v always have biases); Qwen3 reads no mlp_bias.
  attention_bias = family != "qwen2" and bool(hf.get("attention_bias"))
  eos = hf.get("eos_token_id")
  return TransformerConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      d_ff=hf["intermediate_size"], head_dim=hf.get("head_dim"),
      layer_shapes=None if shapes is None else tuple(LayerShape(**s) for s in shapes),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=float(theta), rope_scaling=scaling,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), attention_bias=family == "qwen2" or attention_bias,
      attention_output_bias=attention_bias, mlp_bias=family == "llama" and bool(hf.get("mlp_bias")),
      qk_norm=family == "qwen3", dtype=dtype, param_dtype=dtype,
      max_position_embeddings=hf.get("max_position_embeddings"), bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=tuple(eos if isinstance(eos, list) else () if eos is None else (eos,)))


def _hf_family(config: TransformerConfig) -> str:
  """The one family whose biases and norms match `config`'s, or a ValueError naming the mismatch."""
  if config.norm_placement != "pre":
    raise ValueError(f"norm_placement={config.norm_placement!r} has post-norms that Llama/Qwen checkpoints "
                     "cannot express; only 'pre' can be saved")
  if config.moe is not None:
    raise ValueError("MoE feed-forward layers have no counterpart in Llama/Qwen2/Qwen3 checkpoints")
  if config.mlp_activation != "swiglu":
    raise ValueError(f"mlp_activation={config.mlp_activation!r}: Llama/Qwen feed-forwards are SwiGLU")
  if config.attention_bias and not config.attention_output_bias and not config.qk_norm and not config.mlp_bias:
    return "qwen2"
  if config.attention_bias != config.attention_output_bias:
    raise ValueError(f"attention_bias={config.attention_bias} with attention_output_bias="
                     f"{config.attention_output_bias} matches no Hugging Face family: q/k/v biases alone are "
                     "Qwen2's (no q/k norms, no mlp_bias), Llama's and Qwen3's attention_bias covers o_proj too")
  if config.qk_norm and config.mlp_bias:
    raise ValueError("qk_norm with mlp_bias matches no Hugging Face family (Qwen3 has no MLP biases; a pruned "
                     "Qwen3 keeps its FFN refit bias-free: prune(..., mlp_recovery_bias=False))")
  return "qwen3" if config.qk_norm else "llama"


def _save_family(config: TransformerConfig, architecture: str | None) -> str:
  """The family `config` is saved as: `architecture`'s (checked to fit), else the one its fields imply."""
  if architecture is None:
    return openpangu.family_for(config) or _hf_family(config)
  families = {**{name: family for family, name in _ARCHITECTURES.items()}, **openpangu.ARCHITECTURES}
  if architecture not in families:
    raise ValueError(f"architecture {architecture!r} cannot be saved; known: {sorted(families)}")
  family = families[architecture]
  if family in _ARCHITECTURES and family != _hf_family(config):
    raise ValueError(f"this config is a {_hf_family(config)} model, not {architecture}")
  return family


def config_to_hf(config: TransformerConfig, architecture: str | None = None) -> dict:
  """The config.json of `config` as `architecture` (e.g. "PanguEmbeddedForCausalLM"), or by default: an MLA
  model as PanguUltraMoEForCausalLM, else Qwen2 when it has q/k/v biases only, Qwen3 with q/k norms, else Llama.

  max_position_embeddings is the config's, or DEFAULT_MAX_POSITION_EMBEDDINGS when it does not know.
  """
  family = _save_family(config, architecture)
  if config.mtp_layers and family != openpangu.ULTRA_MOE:
    raise ValueError(f"mtp_layers={config.mtp_layers}: only PanguUltraMoEForCausalLM folders hold an MTP layer, "
                     f"not {architecture or family}")
  if family in openpangu.SAVED_ARCHITECTURE:
    return openpangu.config_to_openpangu(config, family, _llama_fields(config, "llama"))
  return _llama_fields(config, family)


def _llama_fields(config: TransformerConfig, family: str) -> dict:
  hf = {
      "architectures": [_ARCHITECTURES[family]], "model_type": family, "vocab_size": config.vocab_size,
      "hidden_size": config.d_model, "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layers,
      "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
      "head_dim": config.head_dim, "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings or DEFAULT_MAX_POSITION_EMBEDDINGS,
      "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "rope_scaling": None,
      "tie_word_embeddings": config.tie_embeddings, "attention_bias": config.attention_output_bias,
      "mlp_bias": config.mlp_bias, "torch_dtype": config.param_dtype,
  }
  if config.bos_token_id is not None:
    hf["bos_token_id"] = config.bos_token_id
  if config.eos_token_ids:
    eos = config.eos_token_ids
    hf["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
  if family == "qwen2":
    hf["use_sliding_window"] = False
  scaling = config.rope_scaling
  if scaling is not None:
    hf["rope_scaling"] = {"rope_type": scaling.kind, "factor": scaling.factor}
    if scaling.kind in ("llama3", "yarn"):
      hf["rope_scaling"]["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    if scaling.kind == "llama3":
      hf["rope_scaling"].update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor)
    if scaling.kind == "yarn":
      hf["rope_scaling"].update(beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow, truncate=scaling.truncate)
      if scaling.attention_factor is not None:
        hf["rope_scaling"]["attention_factor"] = scaling.attention_factor
  if config.layer_shapes is not None and not config.is_uniform:
    hf[LAYER_SHAPES_KEY] = [dataclasses.asdict(s) for s in config.layer_shapes]
  return hf


# ----------------------------------------------------------------------------------------------------------
# Loading


def _weight_files(path: str) -> dict[str, str]:
  """HF tensor name -> the safetensors file holding it."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  single = os.path.join(path, SINGLE_FILE)
  if not os.path.isfile(single):
    raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
  with safe_open(single, framework="np") as f:
    return {name: single for name in f.keys()}


def _tensor_info(files: dict[str, str]) -> dict[str, tuple[tuple[int, ...], str]]:
  """Shape and safetensors dtype of every tensor in `files`, from the file headers only."""
  info = {}
  for file in sorted(set(files.values())):
    with safe_open(file, framework="np") as f:
      for name in f.keys():
        if files.get(name) == file:
          tensor = f.get_slice(name)
          info[name] = (tuple(tensor.get_shape()), tensor.get_dtype())
  return info


def _check_tensors(entries: list[_Entry], copies: dict[str, str], files: dict[str, str],
                   info: dict[str, tuple[tuple[int, ...], str]], where: str) -> dict[str, str]:
  """Maps every needed HF name to its file; raises naming missing, unexpected or misshapen tensors (`copies`,
  copy name -> copied name, may be absent)."""
  expected = {name: e.layout.hf_shape(e.shape) for e in entries for name in e.hf_names}
  tied_head = "lm_head.weight" if "lm_head.weight" not in expected else None
  missing = sorted(set(expected) - set(info))
  unexpected = sorted(n for n in set(info) - set(expected) - set(copies)
                      if n != tied_head and not n.endswith(_IGNORED_SUFFIXES))
  problems = [f"missing {missing}"] * bool(missing) + [f"unexpected {unexpected}"] * bool(unexpected)
  shapes = {**expected, **{copy: expected[main] for copy, main in copies.items() if copy in info}}
  for name in sorted(set(shapes) & set(info)):
    shape, dtype = info[name]
    if shape != shapes[name]:
      problems.append(f"{name} has shape {list(shape)}, config expects {list(shapes[name])}")
    if dtype not in _SAFETENSORS_DTYPES:
      problems.append(f"{name} has unsupported dtype {dtype}")
  if problems:
    raise CheckpointFormatError(f"{where}: tensors do not match the config: " + "; ".join(problems))
  return {name: files[name] for name in expected}


def _check_copies(copies: dict[str, str], files: dict[str, str], where: str, block_bytes: int = 64 << 20) -> None:
  """Raises naming each copy present in `files` that differs from the tensor it copies (pangu holds the tensor
  once), reading both in row blocks of about `block_bytes`."""
  for copy, main in copies.items():
    if copy not in files:
      continue
    with safe_open(files[copy], framework="np") as f, safe_open(files[main], framework="np") as g:
      a, b = f.get_slice(copy), g.get_slice(main)
      rows = a.get_shape()[0]
      step = max(1, block_bytes // max(1, 4 * math.prod(a.get_shape()[1:])))
      blocks = ((i, min(i + step, rows)) for i in range(0, rows, step))
      if any(not np.array_equal(a[i:j], b[i:j]) for i, j in blocks):
        raise CheckpointFormatError(f"{where}: {copy} differs from {main}; pangu's MTP block shares the main "
                                    "model's embedding and output head, so the copy must equal it")


def _read_array(file: str, name: str, layout: Layout, shape: tuple[int, ...], sharding, dtype) -> jax.Array:
  """One HF tensor as our [shape] array in `sharding`, each distinct device slice read once from disk."""
  with safe_open(file, framework="np") as f:
    tensor = f.get_slice(name)
    slices = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
      key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
      if key not in slices:
        slices[key] = layout.read(tensor, shape, index).astype(dtype)
      return slices[key]

    return jax.make_array_from_callback(shape, sharding, shard)


@functools.partial(jax.jit, donate_argnums=0)
def _set_piece(stacked: jax.Array, piece: jax.Array, index: jax.Array) -> jax.Array:
  """stacked[*index] = piece, for index over the leading len(index) axes."""
  start = (*index, *(jnp.int32(0),) * piece.ndim)
  return jax.lax.dynamic_update_slice(stacked, piece.reshape((1,) * index.shape[0] + piece.shape), start)


def _piece_sharding(sharding, stacked_axes: int) -> Any:
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[stacked_axes:]))
  return sharding


def load_pretrained(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: str | None = None,
                    scan_layers: bool = True,
                    logical_rules: rules.LogicalRules = rules.DEFAULT_RULES) -> tuple[TransformerConfig, dict]:
  """Reads an HF Llama / Qwen2 / Qwen3 / openPangu folder into (config, params).

  Args:
    path: folder with config.json and model.safetensors (or shards + model.safetensors.index.json).
    mesh: shard every parameter by the logical-axis rules on this mesh; None puts them on the default device.
    dtype: parameter and compute dtype (float32, bfloat16, float16); None keeps the checkpoint's.
    scan_layers: the config's `scan_layers` (a uniform model's params are then stacked over layers).
  """
  path = os.fspath(path)
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{path}: no {CONFIG_FILE}")
  with open(config_path) as f:
    hf = json.load(f)
  files = _weight_files(path)
  info = _tensor_info(files)
  stored_dtype = info.get("model.embed_tokens.weight", next(iter(info.values())))[1]
  dtype = dtype or _SAFETENSORS_DTYPES.get(stored_dtype, "float32")
  config = config_from_hf(hf, dtype=dtype, where=config_path).replace(scan_layers=scan_layers)
  family = checkpoint_family(hf, config_path)
  entries, copies = _entries(config, family), _shared_copies(config, family)
  needed = _check_tensors(entries, copies, files, info, path)
  _check_copies(copies, files, path)
  files = needed

  abstract = abstract_params(config)
  if mesh is None:
    device = SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, nn.unbox(abstract))
  else:
    shardings = rules.param_shardings(abstract, mesh, logical_rules)
  flat_shardings = {_path_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  # Per-leaf dtypes: norm gains stay float32 whatever the param dtype, as the model creates them.
  dtypes = {_path_keys(p): x.dtype for p, x in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]}

  leaves = {}
  for e in entries:
    sharding, leaf_dtype = flat_shardings[e.path], dtypes[e.path]
    if not e.stack:
      leaves[e.path] = _read_array(files[e.hf_names[0]], e.hf_names[0], e.layout, e.shape, sharding, leaf_dtype)
      continue
    stacked = jnp.zeros((*e.stack, *e.shape), leaf_dtype, device=sharding)
    for i, name in enumerate(e.hf_names):
      piece = _read_array(files[name], name, e.layout, e.shape, _piece_sharding(sharding, len(e.stack)), leaf_dtype)
      stacked = _set_piece(stacked, piece, jnp.asarray(np.unravel_index(i, e.stack), jnp.int32))
    leaves[e.path] = stacked
  treedef = jax.tree.structure(shardings)
  ordered = [leaves[_path_keys(p)] for p, _ in jax.tree_util.tree_flatten_with_path(shardings)[0]]
  return config, jax.tree.unflatten(treedef, ordered)


# ----------------------------------------------------------------------------------------------------------
# Saving


def _hf_tensors(config: TransformerConfig, params: dict,
                family: str) -> Iterator[tuple[str, Callable[[], np.ndarray], int]]:
  """(HF name, a function producing that tensor on the host, its byte size), in HF order."""
  flat = {_path_keys(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  by_name = {}
  for e in _entries(config, family):
    leaf = flat[e.path]
    for i, name in enumerate(e.hf_names):
      get = (lambda leaf=leaf, i=i, e=e: e.layout.to_hf(np.asarray(leaf[np.unravel_index(i, e.stack)]
                                                                    if e.stack else leaf)))
      by_name[name] = (get, math.prod(e.shape) * leaf.dtype.itemsize)
  for copy, main in _shared_copies(config, family).items():
    by_name[copy] = by_name[main]
  layer_names = sorted((n for n in by_name if n.startswith("model.layers.")),
                       key=lambda n: (int(n.split(".")[2]), n))
  order = ["model.embed_tokens.weight", *layer_names, "model.norm.weight", "lm_head.weight"]
  for name in order:
    if name in by_name:
      yield name, *by_name[name]


def save_pretrained(config: TransformerConfig, params: dict, path: str | os.PathLike, *,
                    architecture: str | None = None, max_shard_bytes: int = 2 << 30) -> None:
  """Writes config.json + model.safetensors (or numbered shards and an index when over max_shard_bytes).

  Tensors keep the params' dtype bit for bit, so `load_pretrained` gives back the same arrays (in the
  `training` layout: `decode`-layout params are transposed back first). The host holds at most one shard's
  tensors at a time. `architecture` picks the format (see `config_to_hf`; e.g. "PanguEmbeddedForCausalLM").
  """
  hf_config = config_to_hf(config, architecture)
  family = _save_family(config, architecture)
  config, params = convert_param_layout(config, params, "training")
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  tensors = list(_hf_tensors(config, params, family))
  shards, size = [[]], 0
  for item in tensors:
    if shards[-1] and size + item[2] > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += item[2]
  names = [SINGLE_FILE] if len(shards) == 1 else [
      f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for file, shard in zip(names, shards):
    save_file({name: np.ascontiguousarray(get()) for name, get, _ in shard}, os.path.join(path, file),
              metadata={"format": "pt"})
    weight_map.update({name: file for name, _, _ in shard})
  index = os.path.join(path, INDEX_FILE)
  if len(shards) > 1:
    with open(index, "w") as f:
      json.dump({"metadata": {"total_size": sum(t[2] for t in tensors)}, "weight_map": weight_map}, f, indent=2)
  elif os.path.exists(index):  # left by an earlier sharded save; it would shadow the new single file
    os.remove(index)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(hf_config, f, indent=2)
