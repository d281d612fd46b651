"""Expert parallelism: experts split over the mesh axes of the logical `expert` axis, tokens travel to them.

P devices hold N / P experts each (contiguous blocks of ids, so MoGE group g lives on device g // (M / P)).
Tokens are split over the batch axes, which must include the expert axes. Inside one `jax.shard_map` each
device exchanges its tokens with the devices that hold their experts, runs its experts (`experts.py`) and
sends the results back. Expert outputs are weighted on the expert side, so every exchange returns one row per
(token, device) or per slot. Exchanges:

- `fixed` (MoGE, dropless, M divisible by P): every token uses exactly K / P experts on every device, so each
  device sends each token once to every device with its K / P local expert ids, in one fixed-size
  `all_to_all`; exact, no padding, and the same volume on every device.
- `ring` (top-K, dropless, CPU): `all_gather` the tokens, run the local experts on the ones routed here,
  `psum_scatter` the partial outputs back.
- `capacity` (any router, `dispatch="capacity"`): per-destination buffers of C = ceil(cf * T K / P) rows,
  one `all_to_all` each way; assignments past C are dropped and counted.
- `ragged` (top-K, dropless, GPU/TPU): `jax.lax.ragged_all_to_all` of exactly the routed rows. It does not run
  on CPU, so the CPU mesh uses `ring`.

Hierarchical dispatch (Pangu Ultra MoE): with the expert axes split into an outer inter-node axis and inner
intra-node axes, tokens are first all-gathered over the node axis (a bandwidth-friendly collective on the slow
fabric), each node keeps the assignments of its own experts and runs one of the exchanges above over its
intra-node axes only; the combine reverses it with a `psum_scatter` over the node axis.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pangu.nn.moe import dispatch
from pangu.nn.moe.config import MoEConfig
from pangu.nn.moe.experts import ExpertWeights, routed_experts
from pangu.parallel import rules
from pangu.parallel.topology import Topology

Axes = tuple[str, ...]
EXCHANGES = ("fixed", "ring", "capacity", "ragged")


@dataclasses.dataclass(frozen=True)
class ExpertParallelLayout:
  """The mesh axes one expert-parallel layer uses.

  Attributes:
    mesh: the (abstract) mesh of the surrounding jit.
    batch_axes: mesh axes that split the tokens; they include every expert axis.
    node_axes: expert axes that cross nodes (hierarchical dispatch), or () for a flat all-to-all.
    local_axes: expert axes inside a node; expert device p = node_index * local_size + local_index.
    tensor_axes: mesh axes that split each expert's hidden width F.
  """

  mesh: jax.sharding.AbstractMesh
  batch_axes: Axes
  node_axes: Axes
  local_axes: Axes
  tensor_axes: Axes

  def size(self, axes: Axes) -> int:
    return math.prod(self.mesh.shape[a] for a in axes)

  @property
  def expert_axes(self) -> Axes:
    return self.node_axes + self.local_axes

  @property
  def num_devices(self) -> int:
    """P, the expert-parallel degree."""
    return self.size(self.expert_axes)


def _mesh_axes(logical: str, logical_rules: rules.LogicalRules) -> Axes:
  axes = rules.logical_to_spec((logical,), logical_rules)[0]
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _used_axes(logical: str, mesh, logical_rules: rules.LogicalRules) -> Axes:
  """The mesh axes (of size > 1) a logical axis maps to."""
  return tuple(a for a in _mesh_axes(logical, logical_rules) if mesh.shape[a] > 1)


def balance_token_groups(config: MoEConfig) -> int:
  """How many contiguous token groups the balance loss averages over (`MoEConfig.balance_scope`), under the
  active mesh and logical rules: 1 for `global_batch` or without a mesh; for `microbatch`, one group per batch
  shard (each device's tokens); for `ep_group`, one per expert-parallel group, the batch shards along the batch
  axes that hold no experts. The batch axis is split major-to-minor over its mesh axes, so those axes must come
  before the expert axes for an EP group's tokens to be contiguous.
  """
  mesh = jax.sharding.get_abstract_mesh()
  logical_rules = nn.get_logical_axis_rules()
  if config.balance_scope == "global_batch" or mesh.empty or not logical_rules:
    return 1
  batch_axes = _used_axes(rules.BATCH, mesh, logical_rules)
  if config.balance_scope == "microbatch":
    return math.prod(mesh.shape[a] for a in batch_axes)
  expert_axes = _used_axes(rules.EXPERT, mesh, logical_rules)
  outer = tuple(a for a in batch_axes if a not in expert_axes)
  if batch_axes[:len(outer)] != outer:
    raise ValueError(f"balance_scope='ep_group' needs the batch's mesh axes without experts {outer} before the "
                     f"expert axes {expert_axes} in the batch axes {batch_axes}")
  return math.prod(mesh.shape[a] for a in outer)


def current_layout(config: MoEConfig) -> ExpertParallelLayout | None:
  """The expert-parallel layout under the active mesh and logical rules, or None without expert parallelism.

  Raises ValueError when the expert axes cannot work: P not dividing N, experts on axes that do not split the
  tokens, or hierarchical dispatch with a single expert axis.
  """
  mesh = jax.sharding.get_abstract_mesh()
  logical_rules = nn.get_logical_axis_rules()
  if mesh.empty or not logical_rules:
    return None
  used = lambda logical: _used_axes(logical, mesh, logical_rules)
  expert_axes = used(rules.EXPERT)
  if not expert_axes:
    return None
  batch_axes = used(rules.BATCH)
  num_devices = math.prod(mesh.shape[a] for a in expert_axes)
  if config.num_experts % num_devices:
    raise ValueError(f"expert parallelism over mesh axes {expert_axes} ({num_devices} devices) does not divide "
                     f"num_experts={config.num_experts}")
  if not set(expert_axes) <= set(batch_axes):
    raise ValueError(f"expert axes {expert_axes} must also split the batch (batch axes {batch_axes}) so that "
                     "tokens can travel between expert devices")
  if config.hierarchical_dispatch and len(expert_axes) < 2:
    raise ValueError(f"hierarchical_dispatch needs the experts on an inter-node and an intra-node mesh axis, got "
                     f"{expert_axes}")
  split = 1 if config.hierarchical_dispatch else 0
  return ExpertParallelLayout(mesh=mesh, batch_axes=batch_axes, node_axes=expert_axes[:split],
                              local_axes=expert_axes[split:], tensor_axes=used(rules.MLP))


def use_hierarchical_dispatch(topology: Topology, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
                              logical_rules: rules.LogicalRules = rules.DEFAULT_RULES) -> bool:
  """Whether the expert group spans nodes in a way hierarchical dispatch can use.

  Devices are numbered node-major (`topology.chips_per_node` consecutive ids per node) in mesh order. True iff
  the experts sit on two or more mesh axes, the outermost one steps from node to node, and the inner ones
  stay inside a node; a flat all-to-all is the better choice inside one node.
  """
  sizes = dict(mesh.shape)
  expert_axes = [a for a in _mesh_axes(rules.EXPERT, logical_rules) if sizes[a] > 1]
  if len(expert_axes) < 2:
    return False
  names = list(sizes)
  stride = {a: math.prod(sizes[b] for b in names[names.index(a) + 1:]) for a in names}
  per_node = topology.chips_per_node
  node, inner = expert_axes[0], expert_axes[1:]
  return stride[node] % per_node == 0 and all(per_node % (stride[a] * sizes[a]) == 0 for a in inner)


def exchange_for(config: MoEConfig, num_devices: int) -> str:
  """The exchange a layer uses under P = num_devices expert devices (see the module docstring)."""
  if config.dispatch == "capacity":
    return "capacity"
  if config.router == "moge" and config.num_groups % num_devices == 0:
    return "fixed"
  return "ragged" if jax.default_backend() in ("gpu", "tpu") else "ring"


@dataclasses.dataclass(frozen=True)
class _Device:
  """Static facts one device needs inside the shard_map body, plus its node index (traced)."""

  config: MoEConfig
  layout: ExpertParallelLayout
  node: jax.Array | int

  @property
  def experts_per_device(self) -> int:
    return self.config.num_experts // self.layout.num_devices

  @property
  def local_size(self) -> int:
    return self.layout.size(self.layout.local_axes)

  def local_index(self) -> jax.Array:
    return jax.lax.axis_index(self.layout.local_axes)

  def expert_device(self, expert_ids: jax.Array) -> jax.Array:
    """Local index of the device holding each expert; outside [0, local_size) for other nodes' experts."""
    return expert_ids // self.experts_per_device - self.node * self.local_size


def _fixed(x, weights, expert_ids, experts, dev: _Device):
  """MoGE: one copy of every token to every local device, with the K / P experts it uses there."""
  t, k = expert_ids.shape
  local, per_device = dev.local_size, k // dev.layout.num_devices
  # Columns are group-major and device p holds consecutive groups, so device p's experts are columns
  # [p * K / P, (p + 1) * K / P).
  take = lambda a: jax.lax.dynamic_slice_in_dim(
      a.reshape(t, dev.layout.num_devices, per_device), dev.node * local, local, axis=1).transpose(1, 0, 2)
  first_expert = (dev.node * local + jnp.arange(local)) * dev.experts_per_device
  send = (jnp.broadcast_to(x, (local, *x.shape)), take(weights), take(expert_ids) - first_expert[:, None, None])
  rows, row_weights, row_ids = (jax.lax.all_to_all(a, dev.layout.local_axes, 0, 0) for a in send)
  out = routed_experts(rows.reshape(local * t, -1), row_weights.reshape(local * t, -1),
                       row_ids.reshape(local * t, -1), experts,
                       implementation=dev.config.experts_implementation)
  y = jax.lax.all_to_all(out.reshape(local, t, -1), dev.layout.local_axes, 0, 0).sum(axis=0)
  return y, None, jnp.sum(row_ids >= 0, dtype=jnp.int32)  # every row delivered here is a real assignment


def _ring(x, weights, expert_ids, experts, dev: _Device):
  """Dropless top-K on CPU: gather every token, run the local experts, reduce-scatter the partial outputs."""
  axes = dev.layout.local_axes
  rows, row_weights, row_ids = (jax.lax.all_gather(a, axes, axis=0, tiled=True) for a in (x, weights, expert_ids))
  local_ids = row_ids - (dev.node * dev.local_size + dev.local_index()) * dev.experts_per_device
  valid = (local_ids >= 0) & (local_ids < dev.experts_per_device)
  out = routed_experts(rows, row_weights, local_ids, experts, valid=valid,
                       implementation=dev.config.experts_implementation)
  return jax.lax.psum_scatter(out, axes, scatter_dimension=0, tiled=True), None, valid.sum(dtype=jnp.int32)


def _capacity(x, weights, expert_ids, experts, dev: _Device):
  """Capacity-padded all-to-all: C rows per destination device, choice-major priority, exact drop count."""
  t, k = expert_ids.shape
  local, axes = dev.local_size, dev.layout.local_axes
  capacity = dispatch.bucket_capacity(t * k, dev.layout.num_devices, dev.config.capacity_factor)
  ids = expert_ids.T.reshape(-1)
  token = jnp.tile(jnp.arange(t), k)
  target = dev.expert_device(ids)
  on_node = (target >= 0) & (target < local)
  slot, keep = dispatch.capacity_slots(target, num_buckets=local, capacity=capacity)
  destination = jnp.where(keep, target * capacity + slot, local * capacity)

  def pack(values, fill):
    buffer = jnp.full((local * capacity, *values.shape[1:]), fill, values.dtype)
    return buffer.at[destination].set(values, mode="drop").reshape(local, capacity, *values.shape[1:])

  send = (pack(x[token], 0), pack(weights.T.reshape(-1, 1), 0), pack(ids[:, None] % dev.experts_per_device, 0),
          pack(jnp.ones((t * k, 1), bool), False))
  rows, row_weights, row_ids, valid = (jax.lax.all_to_all(a, axes, 0, 0).reshape(local * capacity, -1)
                                       for a in send)
  out = routed_experts(rows, row_weights, row_ids, experts, valid=valid,
                       implementation=dev.config.experts_implementation)
  back = jax.lax.all_to_all(out.reshape(local, capacity, -1), axes, 0, 0).reshape(local * capacity, -1)
  y = jnp.zeros_like(x).at[token].add(back.at[destination].get(mode="fill", fill_value=0))
  return y, jnp.sum(on_node & ~keep).astype(jnp.int32), valid.sum(dtype=jnp.int32)


def _ragged(x, weights, expert_ids, experts, dev: _Device):
  """Dropless top-K on GPU/TPU: `ragged_all_to_all` of exactly the rows each device's experts need.

  The receive buffer holds the worst case (every row of every device routed here), so nothing is dropped.
  """
  t, k = expert_ids.shape
  local, axes = dev.local_size, dev.layout.local_axes
  ids = expert_ids.reshape(-1)
  target = dev.expert_device(ids)
  bucket = jnp.where((target >= 0) & (target < local), target, local)
  order = jnp.argsort(bucket, stable=True)
  token = order // k
  send_sizes = jnp.zeros((local + 1,), jnp.int32).at[bucket].add(1)[:local]
  # sizes[s, r]: rows device s sends to device r, known to every device after one small all_gather.
  sizes = jax.lax.all_gather(send_sizes, axes, axis=0, tiled=False)
  me = dev.local_index()
  recv_sizes = sizes[:, me]
  send_offsets = jnp.cumsum(send_sizes) - send_sizes
  recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
  offsets_at_receiver = (jnp.cumsum(sizes, axis=0) - sizes)[me]
  offsets_at_sender = (jnp.cumsum(sizes, axis=1) - sizes)[:, me]
  rows_max = local * t * k

  def exchange(values):
    out = jnp.zeros((rows_max, *values.shape[1:]), values.dtype)
    return jax.lax.ragged_all_to_all(values, out, send_offsets, send_sizes, offsets_at_receiver, recv_sizes,
                                     axis_name=axes)

  rows, row_weights, row_ids = (exchange(a) for a in (x[token], weights.reshape(-1)[order, None],
                                                      (ids[order] % dev.experts_per_device)[:, None]))
  valid = (jnp.arange(rows_max) < recv_sizes.sum())[:, None]
  out = routed_experts(rows, row_weights, row_ids, experts, valid=valid,
                       implementation=dev.config.experts_implementation)
  back = jax.lax.ragged_all_to_all(out, jnp.zeros((t * k, x.shape[1]), x.dtype), recv_offsets, recv_sizes,
                                   offsets_at_sender, send_sizes, axis_name=axes)
  return jnp.zeros_like(x).at[token].add(back), None, recv_sizes.sum(dtype=jnp.int32)


_EXCHANGE_FNS = {"fixed": _fixed, "ring": _ring, "capacity": _capacity, "ragged": _ragged}


def _device_step(x, weights, expert_ids, experts, *, config: MoEConfig, layout: ExpertParallelLayout,
                 exchange: str):
  # The kernels arrive replicated over the batch axes that hold no experts. Mark them varying there once, up
  # front: their gradient's psum then runs here, not inside the experts' per-device `lax.cond` (a collective
  # under a branch that differs between devices deadlocks).
  replicated = tuple(a for a in layout.batch_axes if a not in layout.expert_axes + layout.tensor_axes)
  if replicated:
    experts = ExpertWeights(*(jax.lax.pcast(w, replicated, to="varying") for w in experts))
  node_axes = layout.node_axes
  if node_axes:
    x, weights, expert_ids = (jax.lax.all_gather(a, node_axes, axis=0, tiled=True) for a in (x, weights, expert_ids))
  node = jax.lax.axis_index(node_axes) if node_axes else 0
  y, dropped, received = _EXCHANGE_FNS[exchange](x, weights, expert_ids, experts, _Device(config, layout, node))
  if node_axes:
    y = jax.lax.psum_scatter(y, node_axes, scatter_dimension=0, tiled=True)
  if layout.tensor_axes:
    y = jax.lax.psum(y, layout.tensor_axes)
  dropped = jnp.zeros((), jnp.int32) if dropped is None else jax.lax.psum(dropped, layout.batch_axes)
  # Device p's count at entry p, summed over the batch axes: replicas of one expert device (batch axes without
  # experts) each computed their own tokens.
  me = jax.nn.one_hot(jax.lax.axis_index(layout.expert_axes), layout.num_devices, dtype=jnp.int32)
  return y, dropped, jax.lax.psum(me * received, layout.batch_axes)


class ExpertParallelOutput(NamedTuple):
  """What one expert-parallel layer returns.

  Attributes:
    y: [T, D] the routed experts' output.
    dropped: [] assignments the capacity exchange dropped over the whole batch (0 for dropless exchanges).
    received: [P] assignments each expert device computed, counted from what the exchange delivered to it (so
      capacity drops are not counted), summed over the whole batch: the device load the step waits for.
  """

  y: jax.Array
  dropped: jax.Array
  received: jax.Array


def expert_parallel_experts(x: jax.Array, weights: jax.Array, expert_ids: jax.Array, experts: ExpertWeights, *,
                            config: MoEConfig, layout: ExpertParallelLayout,
                            exchange: str | None = None) -> ExpertParallelOutput:
  """Routed experts under expert parallelism: x [T, D], weights / expert_ids [T, K] -> (y, dropped, received).

  Equals `routed_experts` (dropless exchanges) on one device. `exchange` overrides `exchange_for`; see
  `ExpertParallelOutput` for the counts.
  """
  chex.assert_rank(x, 2)
  chex.assert_equal_shape([weights, expert_ids])
  exchange = exchange or exchange_for(config, layout.num_devices)
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
  if exchange == "fixed" and config.num_groups % layout.num_devices:
    raise ValueError(f"the fixed all-to-all needs whole MoGE groups per device: num_groups={config.num_groups} is "
                     f"not divisible by {layout.num_devices} expert devices")
  splits = layout.size(layout.batch_axes)
  if x.shape[0] % splits:
    raise ValueError(f"{x.shape[0]} tokens cannot be split over the {splits} devices of mesh axes "
                     f"{layout.batch_axes}")
  tokens = PartitionSpec(layout.batch_axes, None)
  ep, tp = layout.expert_axes, layout.tensor_axes or None
  expert_specs = ExpertWeights(PartitionSpec(ep, None, tp), PartitionSpec(ep, None, tp), PartitionSpec(ep, tp, None))
  body = functools.partial(_device_step, config=config, layout=layout, exchange=exchange)
  return ExpertParallelOutput(*jax.shard_map(
      body, mesh=layout.mesh, in_specs=(tokens, tokens, tokens, expert_specs),
      out_specs=(tokens, PartitionSpec(), PartitionSpec()), check_vma=True)(x, weights, expert_ids, experts))
