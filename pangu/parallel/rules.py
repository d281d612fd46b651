"""One logical-axis vocabulary for parameters and activations, and the table mapping it to mesh axes.

Every parameter is created with `nn.with_logical_partitioning(init, names)` and every activation that needs a
layout is constrained with `constrain(x, names)`. Only this table knows the mesh axes (see `mesh.MESH_AXES`),
so a new parallelism layout is a new table, not a change to the model.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Parameter axes.
VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, EXPERT, LAYERS, NORM = (
    "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "expert", "layers", "norm")
# Activation axes.
BATCH, LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = (
    "activation_batch", "activation_length", "activation_embed", "activation_heads",
    "activation_kv_heads", "activation_mlp", "activation_vocab")
# The slots of a KV cache: its own name so long caches can be split over devices without splitting the
# sequence axis of every other activation.
CACHE_LENGTH = "cache_length"
# Tokens grouped by the expert that processes them (the [E, C, D] buffers of capacity dispatch): split over the
# devices that hold those experts.
ACT_EXPERT = "activation_expert"

DEFAULT_RULES: LogicalRules = (
    # Parameters: FSDP shards the model dimension, tensor parallelism the head / ffn / vocab dimension.
    (VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (HEAD_DIM, None),
    (MLP, "tensor"),
    (EXPERT, "expert"),
    (LAYERS, None),
    (NORM, None),
    # Activations: the batch is split over every data-like axis; features follow their weights.
    (BATCH, ("data", "fsdp", "expert")),
    (LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_KV_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
    (CACHE_LENGTH, None),
    (ACT_EXPERT, "expert"),
)


def logical_to_spec(names: Sequence[str | None], rules: LogicalRules = DEFAULT_RULES) -> PartitionSpec:
  """Maps logical axis names to a mesh PartitionSpec; unknown names are an error, not a silent replica."""
  table = dict(rules)
  unknown = [n for n in names if n is not None and n not in table]
  if unknown:
    raise ValueError(f"logical axes {unknown} are not in the rules table {sorted(table)}")
  return PartitionSpec(*(table[n] if n is not None else None for n in names))


def _check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, where: str) -> None:
  for dim, (size, axes) in enumerate(zip(shape, spec)):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    parts = 1
    for a in axes:
      parts *= mesh.shape[a]
    if size % parts:
      raise ValueError(f"{where}: dimension {dim} of size {size} cannot be split {parts} ways over mesh axes "
                       f"{axes}; pick a plan whose sizes divide it")


def param_shardings(abstract_params: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
  """NamedShardings for a boxed (LogicallyPartitioned) abstract param tree, checked for divisibility."""
  specs = nn.get_partition_spec(abstract_params)

  def to_sharding(path, leaf, spec):
    mesh_spec = logical_to_spec(tuple(spec), rules) if spec is not None else PartitionSpec()
    _check_divisible(leaf.shape, mesh_spec, mesh, jax.tree_util.keystr(path))
    return NamedSharding(mesh, mesh_spec)

  unboxed = nn.unbox(abstract_params)
  return jax.tree_util.tree_map_with_path(
      to_sharding, unboxed, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def activation_sharding(mesh: Mesh, names: Sequence[str | None],
                        rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, rules))


def split_ways(*names: str) -> int:
  """Into how many parts the active mesh and rules split an array along these logical axes together (1 when
  no mesh is active): how a layer learns how much of a global shape one device holds."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  ways = 1
  for axes in nn.logical_to_mesh_axes(names):
    for axis in (axes,) if isinstance(axes, str) else axes or ():
      ways *= mesh.shape[axis]
  return ways


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's layout by logical names when a mesh and rules are active (no-op otherwise)."""
  return nn.with_logical_constraint(x, tuple(names))
