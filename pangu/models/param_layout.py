"""Converts params between the `training` and `decode` kernel layouts of pangu.nn.linear.

Each kernel's axes carry logical names (the ones sharding uses), so the conversion is read off the two
models' abstract params: a leaf whose names are permuted between the layouts is transposed by that
permutation, every other leaf is passed through. A new module that declares its kernels with
`pangu.nn.linear.kernel` is covered without changes here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from pangu.models.config import PARAM_LAYOUTS, TransformerConfig
from pangu.models.transformer import abstract_params


def _names(tree) -> dict:
  boxed = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  return {path: tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else None for path, leaf in boxed}


def _permutation(source: tuple, target: tuple, where: str) -> tuple[int, ...]:
  if len(set(source)) != len(source) or sorted(source, key=str) != sorted(target, key=str):
    raise ValueError(f"{where}: axes {source} -> {target} are not a permutation of distinct names")
  return tuple(source.index(name) for name in target)


def convert_param_layout(config: TransformerConfig, params: dict, layout: str) -> tuple[TransformerConfig, dict]:
  """(config, params) in config.param_layout -> the same model with kernels stored in `layout`.

  Returns new arrays for the transposed kernels (one copy each) and the input arrays for everything else.
  """
  if layout not in PARAM_LAYOUTS:
    raise ValueError(f"layout must be one of {PARAM_LAYOUTS}, got {layout!r}")
  target = config.replace(param_layout=layout)
  if layout == config.param_layout:
    return target, params
  source_names, target_names = _names(abstract_params(config)), _names(abstract_params(target))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if [path for path, _ in leaves] != list(source_names):
    raise ValueError(f"params do not match the {config.param_layout} layout of the config")
  out = []
  for path, leaf in leaves:
    source, dest = source_names[path], target_names[path]
    if source == dest:
      out.append(leaf)
    else:
      out.append(jnp.transpose(leaf, _permutation(source, dest, jax.tree_util.keystr(path))))
  return target, jax.tree.unflatten(treedef, out)
