"""Mixture of Lookup Experts (MoLE, arXiv 2503.15798): experts whose input depends only on the token id.

Training form, per layer l (D width, N experts, F expert width):
  u = rmsnorm_post(h)                                   # router and shared FFN input (the block's FFN norm)
  g = softmax(float32(u @ R))                           # R [D, N]: dense routing over all N experts, no top-k
  h = h + ffn_shared(u) + sum_j g_j * ffn_lj(rmsnorm_expert_l(e))
where e is the embedding output of the token, the same for every layer, and ffn(x) = down(gelu(up(x))).
When a batch (per device) holds more tokens than the vocabulary has rows, training runs the experts once per
vocabulary row and each token reads its row's outputs (`ExpertRows`): the same values at V / tokens of the
expert FLOPs, the table of the lookup form built on the fly.

Because ffn_lj(rmsnorm_expert_l(e)) depends only on the token id, `pangu.models.mole.reparameterize` evaluates
it once for every vocabulary row into a table [V, L, N, D] (stored flat as [V, L * N * D], L outermost), and
the lookup form replaces the experts by the table rows of the current tokens. The table stays off the
device; `lookup_rows` fetches the rows from where `MoLEConfig.table_storage` says it lives, reading the rows of
the most frequent tokens from a device-resident cache when `MoLEConfig.hot_rows` is set (pangu.nn.hot_rows).

The table's formats (float, int8, nf4), file layout and host gathers are in `pangu.nn.lookup_table`.
"""

import dataclasses
import functools
from typing import Literal

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from pangu.config_checks import one_of, positive_ints
from pangu.nn import hot_rows, linear, lookup_table
from pangu.nn.lookup_table import TableShape, stored_row_shapes
from pangu.nn.norms import RMSNorm
from pangu.parallel import host_memory, rules

TableFormat = Literal["float32", "bfloat16", "float16", "int8", "nf4"]
TableStorage = Literal["device", "host", "numpy", "disk"]
TABLE_STORAGES = ("device", "host", "numpy", "disk")


@dataclasses.dataclass(frozen=True)
class MoLEConfig:
  """Lookup experts added to every layer's feed-forward.

  Attributes:
    num_experts: N routed experts per layer (the paper's MoLE-4E / MoLE-16E).
    expert_dim: F, hidden width of each expert (paper: 4 D, like the shared FFN).
    lookup: False for the training form (expert weights); True after `reparameterize` (a table of outputs).
    table_format: how the table stores each row (see pangu.nn.lookup_table); lookup form only.
    table_storage: where the table lives: `device` (a param on the accelerator), `host` (a param in the
      backend's `pinned_host` memory; rows are gathered on the host inside the compiled step, then copied),
      `numpy` (a NumPy array in host RAM loaded from `table_path`) or `disk` (`table_path` memory-mapped).
    table_path: the table directory written by `pangu.models.mole.place_table`, for `numpy` and `disk`.
    hot_rows: rows of the most frequent tokens also kept in device memory when the table lives off it
      (`pangu.models.mole.cache_hot_rows` builds them); only the other tokens' rows cross the link. 0: none.
  """

  num_experts: int
  expert_dim: int
  lookup: bool = False
  table_format: TableFormat = "float32"
  table_storage: TableStorage = "device"
  table_path: str | None = None
  hot_rows: int = 0

  def __post_init__(self):
    positive_ints(self, "num_experts", "expert_dim")
    one_of(self, "table_format", lookup_table.TABLE_FORMATS)
    one_of(self, "table_storage", TABLE_STORAGES)
    file_backed = self.table_storage in ("numpy", "disk")
    if file_backed != (self.table_path is not None):
      raise ValueError(f"MoLEConfig.table_path is needed exactly for table_storage 'numpy' and 'disk', got "
                       f"table_path={self.table_path!r} with table_storage={self.table_storage!r}")
    if not self.lookup and (self.table_format != "float32" or self.table_storage != "device"):
      raise ValueError("MoLEConfig.table_format and table_storage describe the lookup form; the training form "
                       f"(lookup=False) got table_format={self.table_format!r}, table_storage={self.table_storage!r}")
    if not isinstance(self.hot_rows, int) or isinstance(self.hot_rows, bool) or self.hot_rows < 0:
      raise ValueError(f"MoLEConfig.hot_rows must be an int >= 0, got {self.hot_rows!r}")
    if self.hot_rows and self.table_storage == "device":
      raise ValueError(f"MoLEConfig.hot_rows caches rows of a table kept off the device; got hot_rows="
                       f"{self.hot_rows} with table_storage='device' (lookup={self.lookup})")


def gelu_ffn_hidden(x: jax.Array, up: jax.Array) -> jax.Array:
  """Every expert's hidden activation: x [..., D], up [N, D, F] -> [..., N, F] (exact-erf GELU, no bias)."""
  return jax.nn.gelu(linear.weight_einsum("...d,ndf->...nf", x, up), approximate=False)


def expert_outputs(x: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """Every expert on every input: x [..., D], up [N, D, F], down [N, F, D] -> [..., N, D]."""
  return linear.weight_einsum("...nf,nfd->...nd", gelu_ffn_hidden(x, up), down)


@flax.struct.dataclass
class ExpertRows:
  """The training form's expert input given as distinct rows: `rows` [R, D] (the embedding table) and `index`
  [B, S], the row of each token. The experts run once per row instead of once per token."""

  rows: jax.Array
  index: jax.Array


class LookupExperts(nn.Module):
  """The routed half of a MoLE feed-forward; the block adds the shared FFN and the residual.

  Called with the router input u [B, S, D] and, in the training form, the embedding output e [B, S, D] or
  the embedding table with each token's row (`ExpertRows`); in the lookup form, the layer's decoded table
  rows [B, S, N, D] instead of e.

  Attributes:
    config: the MoLEConfig.
    d_model: D.
    norm_eps: epsilon of the per-layer expert RMSNorm.
    kernel_init, output_init: initialisers of router/up and of down (a residual-branch output).
    dtype, param_dtype: compute and parameter dtypes; the router softmax runs in float32.
  """

  config: MoLEConfig
  d_model: int
  norm_eps: float = 1e-5
  kernel_init: nn.initializers.Initializer = jax.nn.initializers.normal(0.02)
  output_init: nn.initializers.Initializer = jax.nn.initializers.normal(0.02)
  dtype: str = "float32"
  param_dtype: str = "float32"

  def _param(self, name, shape, axes, init):
    return self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(self.param_dtype))

  @nn.compact
  def __call__(self, u: jax.Array, expert_input: jax.Array | ExpertRows) -> jax.Array:
    cfg = self.config
    d, n, f = self.d_model, cfg.num_experts, cfg.expert_dim
    chex.assert_rank(u, 3)
    chex.assert_axis_dimension(u, 2, d)
    router = self._param("router", (d, n), (rules.EMBED, None), self.kernel_init)
    logits = linear.weight_einsum("bsd,dn->bsn", u.astype(jnp.float32), router.astype(jnp.float32))
    gates = jax.nn.softmax(logits, axis=-1)
    if cfg.lookup:
      return self._mix(gates, expert_input)
    per_row = isinstance(expert_input, ExpertRows)
    e = RMSNorm(self.norm_eps, name="expert_norm")(expert_input.rows if per_row else expert_input)
    up = self._param("up", (n, d, f), (rules.EXPERT, rules.EMBED, rules.MLP), self.kernel_init)
    down = self._param("down", (n, f, d), (rules.EXPERT, rules.MLP, rules.EMBED), self.output_init)
    if per_row:
      chex.assert_shape(expert_input.index, u.shape[:2])
      chex.assert_shape(expert_input.rows, (None, d))
      table = expert_outputs(e.astype(self.dtype), up.astype(self.dtype), down.astype(self.dtype))
      return self._mix(gates, jnp.take(table, expert_input.index, axis=0))
    chex.assert_equal_shape([u, expert_input])
    hidden = gelu_ffn_hidden(e.astype(self.dtype), up.astype(self.dtype))
    weighted = hidden * gates[..., None].astype(self.dtype)
    return linear.weight_einsum("bsnf,nfd->bsd", weighted, down.astype(self.dtype))

  def _mix(self, gates: jax.Array, expert_rows: jax.Array) -> jax.Array:
    """The gate-weighted sum of each token's N expert outputs [B, S, N, D], in float32."""
    chex.assert_shape(expert_rows, (*gates.shape, self.d_model))
    return jnp.einsum("bsn,bsnd->bsd", gates, expert_rows.astype(jnp.float32)).astype(self.dtype)


def lookup_rows(config: MoLEConfig, shape: TableShape, table: dict[str, jax.Array] | None, tokens: jax.Array,
                dtype, hot: dict[str, jax.Array] | None = None) -> jax.Array:
  """The decoded table rows of `tokens` [B, S] -> [B, S, L, N, D], fetched from the table's storage.

  `table` holds the stored arrays for `device` and `host` storage (params of the lookup model) and is None for
  `numpy` / `disk`, which read `config.table_path` through a host callback. Only the rows of these tokens
  cross to the device, still encoded, in one copy issued before the layer stack; nothing orders it after the
  first attention, so the backend may overlap the two. (One copy per layer, so that layer l would wait for its
  rows alone, measured slower on an H200: 1.71 vs 1.44 ms per batch-16 step.) With `hot` (the device cache
  of `config.hot_rows` rows, see pangu.nn.hot_rows) only the rows it misses are fetched from the storage.
  """
  gather = functools.partial(_stored_rows, config, shape, table)
  stored = gather(tokens) if hot is None else hot_rows.lookup(hot, tokens, gather)[0]
  return lookup_table.decode_rows(stored, shape, config.table_format, dtype)


def _stored_rows(config: MoLEConfig, shape: TableShape, table: dict[str, jax.Array] | None,
                 tokens: jax.Array) -> dict[str, jax.Array]:
  """The still-encoded rows of `tokens` (any shape), read where the table lives."""
  storage = config.table_storage
  if storage == "device":
    return {name: jnp.take(array, tokens, axis=0) for name, array in table.items()}
  if storage == "host":
    gather = lambda table, tokens: {name: a.at[tokens].get(mode="promise_in_bounds") for name, a in table.items()}
    return host_memory.to_device(host_memory.compute_on_host(gather, table, host_memory.to_host(tokens)))
  if table is not None:
    raise ValueError(f"a {storage!r} table is read from table_path; the params must not hold it")
  result = {name: jax.ShapeDtypeStruct((*tokens.shape, *row_shape), dt)
            for name, (row_shape, dt) in stored_row_shapes(shape, config.table_format).items()}
  args = (config.table_path, storage == "disk", shape, config.table_format)
  lookup_table.open_table(*args)  # checks the file against the model now, not inside the compiled step
  gather = functools.partial(lookup_table.host_gather, *args)
  return jax.pure_callback(gather, result, tokens, vmap_method="sequential")


class StoredTable(nn.Module):
  """The lookup table as params ("values" and, quantised, "scales"), for `device` and `host` storage."""

  shape: TableShape
  table_format: str

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    return {
        name: self.param(name, nn.with_logical_partitioning(jax.nn.initializers.zeros, (rules.VOCAB, None)),
                         (self.shape.vocab_size, *row_shape), dtype)
        for name, (row_shape, dtype) in stored_row_shapes(self.shape, self.table_format).items()}


class HotRows(nn.Module):
  """The device cache of a table's most frequent rows (pangu.nn.hot_rows) as params: "slots" [V] int32 and
  the cached stored arrays [n_rows, ...]; built by `pangu.models.mole.cache_hot_rows`."""

  shape: TableShape
  table_format: str
  n_rows: int

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    no_slot = lambda key, shape, dtype: jnp.full(shape, -1, dtype)
    cache = {hot_rows.SLOTS: self.param(hot_rows.SLOTS, nn.with_logical_partitioning(no_slot, (None,)),
                                        (self.shape.vocab_size,), jnp.int32)}
    for name, (row_shape, dtype) in stored_row_shapes(self.shape, self.table_format).items():
      cache[name] = self.param(name, nn.with_logical_partitioning(jax.nn.initializers.zeros, (None, None)),
                               (self.n_rows, *row_shape), dtype)
    return cache
