"""A MoLE lookup table: its geometry, row encodings, file format, and row gathers on the host.

The table holds V rows, one per token id, of L x N vectors of width D (layer outermost, then expert). A row is
stored flat in one of these formats:
  float32 / bfloat16 / float16: the values themselves;
  int8: round(x / s) with one float32 scale s = absmax / 127 per D-vector, so |error| <= absmax / 254;
  nf4: the nearest of the 16 NormalFloat levels (QLoRA) of x / absmax, two codes per byte, one float32 absmax
    per D-vector, so |error| <= absmax * NF4_MAX_HALF_GAP (the largest half-gap between levels, ~0.139).
Quantised rows are decoded on the device, after the copy, so only the encoded bytes move.

On disk a table is a directory: `table.json` (geometry, format, array shapes and dtypes) and one `.npy` per
stored array, written to a temporary directory and renamed into place, so a reader sees a whole table or none.
"""

import dataclasses
import functools
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

TABLE_FORMATS = ("float32", "bfloat16", "float16", "int8", "nf4")
QUANTISED_FORMATS = ("int8", "nf4")
FILE_VERSION = 1
HEADER = "table.json"

# NormalFloat-4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) rescaled to [-1, 1], with exact 0.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
NF4_MAX_HALF_GAP = float(np.max(np.diff(NF4_LEVELS)) / 2)
INT8_MAX = 127


class LookupTableError(ValueError):
  """A table file is missing, corrupt, or does not fit the model that reads it."""


@dataclasses.dataclass(frozen=True)
class TableShape:
  """The table geometry: V rows of L * N vectors of D values."""

  vocab_size: int
  n_layers: int
  num_experts: int
  d_model: int

  @property
  def vectors_per_row(self) -> int:
    return self.n_layers * self.num_experts

  @property
  def values_per_row(self) -> int:
    return self.vectors_per_row * self.d_model


def stored_row_shapes(shape: TableShape, table_format: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Per vocabulary row: the arrays the table stores ("values", and "scales" when quantised) and dtypes."""
  if table_format not in TABLE_FORMATS:
    raise ValueError(f"table_format must be one of {TABLE_FORMATS}, got {table_format!r}")
  if table_format == "nf4":
    if shape.d_model % 2:
      raise ValueError(f"nf4 tables pack two values per byte and need an even d_model, got {shape.d_model}")
    values = ((shape.values_per_row // 2,), np.dtype(np.uint8))
  elif table_format == "int8":
    values = ((shape.values_per_row,), np.dtype(np.int8))
  else:
    values = ((shape.values_per_row,), np.dtype(jnp.dtype(table_format)))
  if table_format in QUANTISED_FORMATS:
    return {"values": values, "scales": ((shape.vectors_per_row,), np.dtype(np.float32))}
  return {"values": values}


def row_bytes(shape: TableShape, table_format: str) -> int:
  """Bytes one token's row moves to the device: L * N * D values (and L * N scales when quantised)."""
  return sum(int(np.prod(s)) * dt.itemsize for s, dt in stored_row_shapes(shape, table_format).values())


def encode_table(table: np.ndarray, table_format: str) -> dict[str, np.ndarray]:
  """Full-precision table [V, L, N, D] -> the stored arrays of `stored_row_shapes` (flattened per row)."""
  table = np.asarray(table, np.float32)
  v = table.shape[0]
  if table_format not in QUANTISED_FORMATS:
    if table_format == "float16" and np.abs(table).max(initial=0.0) > np.finfo(np.float16).max:
      raise ValueError("the table overflows float16; use bfloat16 or a quantised format")
    return {"values": table.reshape(v, -1).astype(jnp.dtype(table_format))}
  absmax = np.abs(table).max(axis=-1, keepdims=True)
  safe = np.where(absmax > 0, absmax, 1.0)
  if table_format == "int8":
    codes = np.rint(table / safe * INT8_MAX).astype(np.int8)
    return {"values": codes.reshape(v, -1), "scales": (absmax / INT8_MAX).reshape(v, -1)}
  codes = np.abs((table / safe)[..., None] - NF4_LEVELS).argmin(axis=-1).astype(np.uint8).reshape(v, -1)
  return {"values": codes[:, 0::2] | (codes[:, 1::2] << 4), "scales": absmax.reshape(v, -1)}


def decode_rows(stored: dict[str, jax.Array], shape: TableShape, table_format: str, dtype) -> jax.Array:
  """Stored rows [..., row] -> [..., L, N, D] in `dtype`."""
  lead = stored["values"].shape[:-1]
  values = stored["values"]
  if table_format == "nf4":
    codes = jnp.stack([values & 0xF, values >> 4], axis=-1).reshape(*lead, -1)
    values = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]
  values = values.reshape(*lead, shape.n_layers, shape.num_experts, shape.d_model).astype(jnp.float32)
  if table_format in QUANTISED_FORMATS:
    values = values * stored["scales"].reshape(*lead, shape.n_layers, shape.num_experts, 1)
  return values.astype(dtype)


def error_bound(table: np.ndarray, table_format: str) -> np.ndarray:
  """The documented per-value bound on |decode(encode(table)) - table| for a table [V, L, N, D]."""
  table = np.asarray(table, np.float32)
  absmax = np.abs(table).max(axis=-1, keepdims=True)
  if table_format == "int8":
    return np.broadcast_to(absmax / (2 * INT8_MAX), table.shape) * (1 + 1e-6)
  if table_format == "nf4":
    return np.broadcast_to(absmax * NF4_MAX_HALF_GAP, table.shape) * (1 + 1e-6)
  # Round to nearest: half an ulp, relative for normal numbers, half the subnormal spacing below them.
  info = jnp.finfo(jnp.dtype(table_format))
  return np.abs(table) * float(info.eps) / 2 + float(info.smallest_subnormal) / 2


def save_table(path: str, shape: TableShape, table_format: str, stored: dict[str, np.ndarray]) -> None:
  """Writes the stored arrays to the directory `path` atomically (a concurrent reader never sees half)."""
  expected = stored_row_shapes(shape, table_format)
  if set(stored) != set(expected):
    raise LookupTableError(f"a {table_format} table stores {sorted(expected)}, got {sorted(stored)}")
  header = {"file_version": FILE_VERSION, "table_format": table_format, **dataclasses.asdict(shape), "arrays": {}}
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".table-", dir=parent)
  try:
    for name, (row_shape, dtype) in expected.items():
      array = np.asarray(stored[name])
      if array.shape != (shape.vocab_size, *row_shape) or array.dtype != dtype:
        raise LookupTableError(f"{name}: expected {(shape.vocab_size, *row_shape)} {dtype}, got "
                               f"{array.shape} {array.dtype}")
      # bfloat16 has no NumPy file dtype: store its bits as uint16.
      np.save(os.path.join(tmp, f"{name}.npy"), array.view(np.uint16) if dtype == jnp.bfloat16 else array)
      header["arrays"][name] = {"shape": list(array.shape), "dtype": str(dtype)}
    with open(os.path.join(tmp, HEADER), "w") as f:
      json.dump(header, f, indent=1)
    old = None
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=".table-old-", dir=parent)
      os.replace(path, os.path.join(old, "table"))
    os.replace(tmp, path)
    if old is not None:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_table(path: str, *, mmap: bool = False, expected_shape: TableShape | None = None,
               expected_format: str | None = None) -> tuple[TableShape, str, dict[str, np.ndarray]]:
  """Reads a table directory -> (shape, format, stored arrays), memory-mapped with `mmap`.

  Raises LookupTableError when the files are missing or inconsistent, or when the geometry or format differ
  from `expected_shape` / `expected_format` (the model that will read it), naming every differing field.
  """
  try:
    with open(os.path.join(path, HEADER)) as f:
      header = json.load(f)
    shape = TableShape(*(int(header[k]) for k in ("vocab_size", "n_layers", "num_experts", "d_model")))
    table_format = header["table_format"]
    expected = stored_row_shapes(shape, table_format)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise LookupTableError(f"{path} is not a readable lookup table: {e}") from e
  mismatches = []
  if expected_shape is not None:
    mismatches += [f"{k}: file {getattr(shape, k)}, model {getattr(expected_shape, k)}"
                   for k in ("vocab_size", "n_layers", "num_experts", "d_model")
                   if getattr(shape, k) != getattr(expected_shape, k)]
  if expected_format is not None and table_format != expected_format:
    mismatches.append(f"table_format: file {table_format}, model {expected_format}")
  if mismatches:
    raise LookupTableError(f"the lookup table {path} does not match the model: " + "; ".join(mismatches))
  stored = {}
  for name, (row_shape, dtype) in expected.items():
    file = os.path.join(path, f"{name}.npy")
    try:
      array = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise LookupTableError(f"{file} is missing or corrupt: {e}") from e
    if dtype == jnp.bfloat16 and array.dtype == np.uint16:
      array = array.view(jnp.bfloat16)
    if array.shape != (shape.vocab_size, *row_shape) or array.dtype != dtype:
      raise LookupTableError(f"{file} holds {array.shape} {array.dtype}, the header says "
                             f"{(shape.vocab_size, *row_shape)} {dtype}")
    stored[name] = array
  return shape, table_format, stored


@functools.lru_cache(maxsize=8)
def open_table(path: str, mmap: bool, shape: TableShape, table_format: str) -> dict[str, np.ndarray]:
  """The stored arrays of a table file, opened once per (path, mode) and checked against the model."""
  return load_table(path, mmap=mmap, expected_shape=shape, expected_format=table_format)[2]


class TransferCounter:
  """Bytes that host-gathered (`numpy` / `disk`) rows moved towards the device, per table path."""

  def __init__(self):
    self.bytes: dict[str, int] = {}

  def add(self, path: str, nbytes: int) -> None:
    self.bytes[path] = self.bytes.get(path, 0) + nbytes

  def reset(self) -> None:
    self.bytes.clear()


TRANSFERS = TransferCounter()


def host_gather(path: str, mmap: bool, shape: TableShape, table_format: str,
                tokens: np.ndarray) -> dict[str, np.ndarray]:
  """The stored rows of `tokens` (any shape) read on the host; counts the bytes in TRANSFERS."""
  stored = open_table(path, mmap, shape, table_format)
  tokens = np.asarray(tokens)
  if tokens.size and not 0 <= tokens.min() <= tokens.max() < shape.vocab_size:
    raise LookupTableError(f"token ids must be in [0, {shape.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
  rows = {name: np.ascontiguousarray(array[tokens]) for name, array in stored.items()}
  TRANSFERS.add(path, sum(r.nbytes for r in rows.values()))
  return rows
