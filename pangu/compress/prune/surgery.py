"""Structural edits that really shrink a decoder: remove query heads (and the K/V heads left unused), FFN channels
or whole layers from the params, and rewrite the config's per-layer `LayerShape`s to match.

The edits work on the unrolled `training` layout (`unrolled`), where every layer owns its params `layer_i` and its
shape; `finalise` goes back to the caller's layout (scanned again when every layer kept the same shape, since a
scan needs identical layers; see pangu.models.transformer).

Grouped-query attention reshapes the query heads into [K, H/K] groups that share one K/V head, so a pruned layer
must keep the same number of query heads in every kept group (`keep_heads` refuses anything else); `HeadUnits`
describes the two ways of removing heads that respect it.
"""

import collections
import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from pangu.models.config import LayerShape, TransformerConfig
from pangu.models.param_layout import convert_param_layout
from pangu.models.transformer import abstract_params, stack_layers, unstack_layers


@dataclasses.dataclass(frozen=True)
class HeadUnits:
  """The removable units of a layer's attention under a GQA mode.

  Attributes:
    members: the query heads of each unit.
    blocks: each unit's block; a pruning removes the same number of units from every block.
    removes_kv: removing a unit removes its K/V head too (whole KV groups).
  """

  members: tuple[tuple[int, ...], ...]
  blocks: tuple[int, ...]
  removes_kv: bool

  @property
  def membership(self) -> np.ndarray:
    """[U, H] 0/1 matrix: unit u holds query head h."""
    n_heads = sum(len(m) for m in self.members)
    out = np.zeros((len(self.members), n_heads))
    for u, heads in enumerate(self.members):
      out[u, list(heads)] = 1.0
    return out


def head_units(shape: LayerShape, gqa: str) -> HeadUnits:
  """`groups`: one unit per KV group (its H/K query heads and its K/V head; single heads in MHA), one block.
  `heads_per_group`: one unit per query head, one block per KV group, K/V heads kept."""
  group = shape.n_heads // shape.n_kv_heads
  if gqa == "groups":
    members = tuple(tuple(range(g * group, (g + 1) * group)) for g in range(shape.n_kv_heads))
    return HeadUnits(members, (0,) * shape.n_kv_heads, removes_kv=True)
  if gqa == "heads_per_group":
    return HeadUnits(tuple((h,) for h in range(shape.n_heads)), tuple(h // group for h in range(shape.n_heads)),
                     removes_kv=False)
  raise ValueError(f"gqa must be 'groups' or 'heads_per_group', got {gqa!r}")


def unrolled(config: TransformerConfig, params: dict) -> tuple[TransformerConfig, dict]:
  """The same model with per-layer params `layer_i`, [in, out] kernels and an explicit shape for every layer."""
  config, params = convert_param_layout(config, params, "training")
  if config.scanned:
    params = unstack_layers(params, config.n_layers)
  shapes = tuple(config.layer(i) for i in range(config.n_layers))
  return config.replace(scan_layers=False, layer_shapes=shapes), params


def finalise(config: TransformerConfig, params: dict, like: TransformerConfig) -> tuple[TransformerConfig, dict]:
  """An `unrolled` model back in `like`'s layout: uniform shapes become the config's own fields again (so that a
  saved config.json says them), scanned if `like` scans and every layer has the same shape."""
  shapes = config.layer_shapes
  if len(set(shapes)) == 1:
    config = config.replace(layer_shapes=None, n_heads=shapes[0].n_heads, n_kv_heads=shapes[0].n_kv_heads,
                            d_ff=shapes[0].d_ff)
  config = config.replace(scan_layers=like.scan_layers)
  if config.scanned:
    params = stack_layers(params, config.n_layers)
  return convert_param_layout(config, params, like.param_layout)


def _indices(values: Sequence[int], size: int, what: str) -> np.ndarray:
  """Sorted, checked indices into an axis of `size`: ints, no repeats, in range, at least one."""
  values = list(values)
  if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in values):
    raise ValueError(f"{what}: indices must be ints, got {values!r}")
  bad = sorted(int(v) for v in values if not 0 <= v < size)
  if bad:
    raise ValueError(f"{what}: indices {bad} out of range: there are {size}")
  if len(set(values)) != len(values):
    raise ValueError(f"{what}: repeated indices in {sorted(values)}")
  if not values:
    raise ValueError(f"{what}: at least one must be kept")
  return np.asarray(sorted(int(v) for v in values))


def _with_layer(config: TransformerConfig, params: dict, layer: int, changes: dict,
                shape: LayerShape) -> tuple[TransformerConfig, dict]:
  key = f"layer_{layer}"
  shapes = list(config.layer_shapes)
  shapes[layer] = shape
  return config.replace(layer_shapes=tuple(shapes)), {**params, key: {**params[key], **changes}}


def _check_unrolled(config: TransformerConfig, params: dict, layer: int) -> None:
  if config.layer_shapes is None or config.scanned or config.param_layout != "training":
    raise ValueError("surgery works on the unrolled training layout; convert with "
                     "pangu.compress.prune.surgery.unrolled")
  if not 0 <= layer < config.n_layers:
    raise ValueError(f"layer {layer} out of range: the model has {config.n_layers} layers")


def keep_heads(config: TransformerConfig, params: dict, layer: int,
               heads: Sequence[int]) -> tuple[TransformerConfig, dict]:
  """Keeps query heads `heads` of `layer` (with their q / o slices and biases) and the K/V heads they use.

  Raises ValueError for indices out of range, repeats, no head left, or kept groups of unequal sizes (GQA).
  """
  _check_unrolled(config, params, layer)
  shape = config.layer(layer)
  heads = _indices(heads, shape.n_heads, f"layer {layer} query heads")
  group = shape.n_heads // shape.n_kv_heads
  per_group = collections.Counter(int(h) // group for h in heads)
  if len(set(per_group.values())) > 1:
    raise ValueError(f"layer {layer}: grouped-query attention needs the same number of query heads in every kept KV "
                     f"group; the request keeps {dict(sorted(per_group.items()))} (group: heads) of {group} per group")
  groups = np.asarray(sorted(per_group))
  attn = dict(params[f"layer_{layer}"]["attn"])
  for name in ("q", "k", "v"):
    index = heads if name == "q" else groups
    attn[name] = attn[name][:, index]
    if f"{name}_bias" in attn:
      attn[f"{name}_bias"] = attn[f"{name}_bias"][index]
  attn["o"] = attn["o"][heads]
  return _with_layer(config, params, layer, {"attn": attn}, LayerShape(len(heads), len(groups), shape.d_ff))


def keep_channels(config: TransformerConfig, params: dict, layer: int,
                  channels: Sequence[int]) -> tuple[TransformerConfig, dict]:
  """Keeps FFN channels `channels` of `layer`: columns of gate / up (and their biases), rows of down."""
  _check_unrolled(config, params, layer)
  shape = config.layer(layer)
  channels = _indices(channels, shape.d_ff, f"layer {layer} FFN channels")
  mlp = dict(params[f"layer_{layer}"]["mlp"])
  for name in ("gate", "up"):
    if name in mlp:
      mlp[name] = mlp[name][:, channels]
    if f"{name}_bias" in mlp:
      mlp[f"{name}_bias"] = mlp[f"{name}_bias"][channels]
  mlp["down"] = mlp["down"][channels]
  return _with_layer(config, params, layer, {"mlp": mlp}, LayerShape(shape.n_heads, shape.n_kv_heads, len(channels)))


def drop_layers(config: TransformerConfig, params: dict, layers: Sequence[int]) -> tuple[TransformerConfig, dict]:
  """Removes whole decoder layers; the rest are renumbered in order and n_layers shrinks."""
  _check_unrolled(config, params, 0)
  dropped = set(_indices(layers, config.n_layers, "dropped layers").tolist()) if layers else set()
  kept = [i for i in range(config.n_layers) if i not in dropped]
  if not kept:
    raise ValueError(f"dropping layers {sorted(dropped)} would leave no layer")
  rest = {k: v for k, v in params.items() if not k.startswith("layer_")}
  rest.update({f"layer_{j}": params[f"layer_{i}"] for j, i in enumerate(kept)})
  return config.replace(n_layers=len(kept), layer_shapes=tuple(config.layer_shapes[i] for i in kept)), rest


def _fill_missing(abstract, params):
  if not isinstance(abstract, dict):
    return jnp.zeros(abstract.shape, abstract.dtype) if params is None else params
  return {k: _fill_missing(v, params.get(k)) for k, v in abstract.items()}


def enable_output_biases(config: TransformerConfig, params: dict, *, attention: bool,
                         mlp: bool) -> tuple[TransformerConfig, dict]:
  """Turns on the biases output recovery writes into, every new bias zero, so the model computes the same.

  Attention: `o_bias` needs `attention_output_bias`; `attention_bias` (q/k/v) turns on with it because Llama's and
  Qwen3's checkpoints tie all four to one `attention_bias` flag (pangu.interop.hf), so the result still saves as
  one of them. MLP: `mlp_bias` gives gate, up and down a bias; gate / up get zeros.
  """
  new = config.replace(attention_bias=config.attention_bias or attention,
                       attention_output_bias=config.attention_output_bias or attention,
                       mlp_bias=config.mlp_bias or mlp)
  if new == config:
    return config, params
  return new, _fill_missing(nn.unbox(abstract_params(new)), params)
