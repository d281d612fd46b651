"""MoLE after training: re-parameterise the experts into a lookup table and choose where the table lives.

The transforms are pure `(config, params) -> (config, params)` functions:
  `reparameterize` evaluates every layer's experts on every vocabulary row (their input is the token's
    embedding, so this enumerates every input they can ever see), stores the outputs as a table [V, L, N, D]
    in the requested format, and drops the expert weights and expert norms;
  `place_table` moves the table between the device, pinned host memory, host RAM and a memory-mapped file;
  `cache_hot_rows` keeps the rows of the most frequent tokens in device memory beside a table kept off it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pangu.models.config import TransformerConfig
from pangu.models.transformer import LAYERS_KEY, layer_params, mole_table_shape
from pangu.nn import hot_rows, lookup_table
from pangu.nn.mole import TABLE_STORAGES, expert_outputs
from pangu.nn.norms import rms_norm
from pangu.parallel import host_memory

TABLE_KEY = "mole_table"
HOT_KEY = "mole_hot_rows"
EXPERT_PARAMS = ("up", "down", "expert_norm")


@functools.partial(jax.jit, static_argnames="eps")
def _expert_rows(embedding: jax.Array, scale: jax.Array, up: jax.Array, down: jax.Array, *, eps: float):
  """One layer's experts on a chunk of embedding rows [C, D] -> [C, N, D] in float32."""
  e = rms_norm(embedding.astype(jnp.float32), scale, eps)
  return expert_outputs(e, up.astype(jnp.float32), down.astype(jnp.float32))


def expert_table(config: TransformerConfig, params: dict, *, chunk_size: int = 4096) -> np.ndarray:
  """Every expert of every layer on every vocabulary row: float32 [V, L, N, D] in host memory.

  Computed in vocabulary chunks of `chunk_size` rows (the last one padded), so device memory stays bounded
  by chunk_size x N x F activations whatever V is.
  """
  _check_training_form(config)
  shape = mole_table_shape(config)
  embedding = np.asarray(params["embedding"], np.float32)
  table = np.empty((shape.vocab_size, shape.n_layers, shape.num_experts, shape.d_model), np.float32)
  chunk_size = min(chunk_size, shape.vocab_size)
  for l in range(config.n_layers):
    mole = layer_params(config, params, l)["mole"]
    for start in range(0, shape.vocab_size, chunk_size):
      rows = embedding[start:start + chunk_size]
      padded = np.pad(rows, ((0, chunk_size - len(rows)), (0, 0)))
      out = _expert_rows(padded, mole["expert_norm"]["scale"], mole["up"], mole["down"], eps=config.norm_eps)
      table[start:start + len(rows), l] = np.asarray(out)[:len(rows)]
  return table


def reparameterize(config: TransformerConfig, params: dict, *, table_format: str = "float32",
                   chunk_size: int = 4096) -> tuple[TransformerConfig, dict]:
  """Training-form MoLE -> lookup form: (lookup config, params with the table on the device, experts dropped).

  The table is encoded in `table_format` (float32, bfloat16, float16, int8 or nf4; see
  pangu.nn.lookup_table for the error of each); use `place_table` to move it off the device.
  """
  table = expert_table(config, params, chunk_size=chunk_size)
  stored = lookup_table.encode_table(table, table_format)
  lut_config = config.replace(mole=dataclasses.replace(config.mole, lookup=True, table_format=table_format))
  lut_params = _drop_experts(config, params)
  lut_params[TABLE_KEY] = {name: jnp.asarray(array) for name, array in stored.items()}
  return lut_config, lut_params


def table_arrays(config: TransformerConfig, params: dict) -> dict[str, np.ndarray]:
  """The stored table of a lookup-form model as host arrays, wherever it lives."""
  _check_lookup_form(config)
  mole = config.mole
  if mole.table_storage in ("numpy", "disk"):
    return lookup_table.load_table(mole.table_path, mmap=True, expected_shape=mole_table_shape(config),
                                   expected_format=mole.table_format)[2]
  return {name: np.asarray(jax.device_get(array)) for name, array in params[TABLE_KEY].items()}


def place_table(config: TransformerConfig, params: dict, storage: str, *, path: str | None = None,
                device: jax.Device | None = None) -> tuple[TransformerConfig, dict]:
  """Moves a lookup-form model's table to `storage` (see MoLEConfig.table_storage).

  `numpy` and `disk` write the table to the directory `path` (atomically) and keep it out of the params;
  `host` places it in the device's `pinned_host` memory, which needs a backend with that memory kind. A hot-row
  cache (`cache_hot_rows`) stays with a table kept off the device and is dropped with `device`.
  """
  _check_lookup_form(config)
  if storage not in TABLE_STORAGES:
    raise ValueError(f"storage must be one of {TABLE_STORAGES}, got {storage!r}")
  mole = config.mole
  stored = table_arrays(config, params)
  rest = {k: v for k, v in params.items() if k != TABLE_KEY and (k != HOT_KEY or storage != "device")}
  mole = dataclasses.replace(mole, hot_rows=0 if storage == "device" else mole.hot_rows)
  device = device or jax.devices()[0]
  if storage in ("numpy", "disk"):
    if path is None:
      raise ValueError(f"place_table(storage={storage!r}) needs the table directory `path`")
    if mole.table_path != path:
      lookup_table.save_table(path, mole_table_shape(config), mole.table_format, stored)
    lookup_table.open_table.cache_clear()
    return config.replace(mole=dataclasses.replace(mole, table_storage=storage, table_path=path)), rest
  if storage == "host":
    sharding = host_memory.pinned_host_sharding(device, "use storage='numpy' or 'disk'")
  else:
    sharding = jax.sharding.SingleDeviceSharding(device)
  rest[TABLE_KEY] = {name: jax.device_put(np.asarray(array), sharding) for name, array in stored.items()}
  return config.replace(mole=dataclasses.replace(mole, table_storage=storage, table_path=None)), rest


def cache_hot_rows(config: TransformerConfig, params: dict, token_counts: np.ndarray, n_rows: int, *,
                   device: jax.Device | None = None) -> tuple[TransformerConfig, dict]:
  """Keeps the table rows of the `n_rows` most frequent tokens in device memory (pangu.nn.hot_rows).

  token_counts [V]: how often each token occurs, e.g. in the training corpus. The table must already live off
  the device (`place_table`); it stays there whole and serves the other tokens. n_rows=0 drops the cache.
  """
  _check_lookup_form(config)
  if config.mole.table_storage == "device":
    raise ValueError("cache_hot_rows needs a table kept off the device (table_storage host / numpy / disk), got "
                     "table_storage='device': place_table it first")
  cache = hot_rows.build_cache(table_arrays(config, params), token_counts, n_rows)
  rest = {k: v for k, v in params.items() if k != HOT_KEY}
  if n_rows:
    rest[HOT_KEY] = jax.device_put(cache, jax.sharding.SingleDeviceSharding(device or jax.devices()[0]))
  return config.replace(mole=dataclasses.replace(config.mole, hot_rows=n_rows)), rest


def table_bytes(config: TransformerConfig) -> int:
  """Bytes of the whole table of a MoLE model in its (lookup) format: V rows of `row_bytes`."""
  return config.vocab_size * row_bytes_per_token(config)


def row_bytes_per_token(config: TransformerConfig) -> int:
  """Bytes one token's table row moves to the device per forward pass."""
  return lookup_table.row_bytes(mole_table_shape(config), config.mole.table_format)


def _drop_experts(config: TransformerConfig, params: dict) -> dict:
  def drop(layer):
    return {**layer, "mole": {k: v for k, v in layer["mole"].items() if k not in EXPERT_PARAMS}}

  if config.scanned:
    return {**params, LAYERS_KEY: drop(params[LAYERS_KEY])}
  return {k: drop(v) if k.startswith("layer_") else v for k, v in params.items()}


def _check_training_form(config: TransformerConfig) -> None:
  if config.mole is None or config.mole.lookup:
    raise ValueError(f"expected a training-form MoLE config (mole set, lookup=False), got mole={config.mole!r}")


def _check_lookup_form(config: TransformerConfig) -> None:
  if config.mole is None or not config.mole.lookup:
    raise ValueError(f"expected a lookup-form MoLE config (after reparameterize), got mole={config.mole!r}")
