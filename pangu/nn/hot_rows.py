"""A device-resident cache of a lookup table's most frequent rows, the rest left off the device.

MoLE moves one table row per token (L N D values) across the host link. Token frequencies are skewed (a few
dozen byte values make most of English text; BPE vocabularies are Zipfian), so keeping the rows of the most
frequent tokens of the training corpus in device memory serves most lookups without crossing the link, and
only the misses are gathered from the off-device table. This is our extension beyond the paper (issue 11).

A cache is a dict of arrays, kept beside the model's params:
  slots [V] int32: where each token's row sits in the cache, -1 when it is only off the device;
  the cached rows of the stored arrays ("values", and "scales" when quantised) [C, ...], encoded exactly as
    the table stores them, so a hit is bitwise the row the table holds.

Inside a compiled step the number of misses is data, shapes are not: `lookup` compacts the misses and copies
them in the smallest bucket of 0, 1, 2, 4, ... rows (up to T, the tokens of the call) that holds them, one
`lax.switch` branch per bucket, so a step moves fewer than twice its misses and nothing when every token hits.
"""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SLOTS = "slots"
Stored = dict[str, jax.Array]


def hot_token_ids(token_counts: np.ndarray, n_rows: int) -> np.ndarray:
  """The `n_rows` most frequent token ids, most frequent first (ties go to the smaller id)."""
  counts = _checked_counts(token_counts)
  _check_n_rows(n_rows, counts.size)
  return np.argsort(-counts, kind="stable")[:n_rows].astype(np.int32)


def build_cache(stored: Mapping[str, np.ndarray], token_counts: np.ndarray, n_rows: int) -> dict[str, np.ndarray]:
  """(a table's stored arrays [V, ...], token counts [V], n_rows) -> the cache of its n_rows most frequent rows.

  Returns host arrays; place them on the device with `jax.device_put`.
  """
  vocab = {len(a) for a in stored.values()}
  if len(vocab) != 1 or SLOTS in stored:
    raise ValueError(f"stored must hold table arrays of one vocabulary size, got {sorted(stored)} with "
                     f"{sorted(vocab)} rows")
  counts = _checked_counts(token_counts)
  if counts.size != vocab.pop():
    raise ValueError(f"token_counts has {counts.size} entries, the table {len(next(iter(stored.values())))} rows")
  hot = hot_token_ids(counts, n_rows)
  slots = np.full(counts.size, -1, np.int32)
  slots[hot] = np.arange(n_rows, dtype=np.int32)
  return {SLOTS: slots, **{name: np.ascontiguousarray(np.asarray(a)[hot]) for name, a in stored.items()}}


def miss_buckets(n_tokens: int) -> tuple[int, ...]:
  """The row counts a call with `n_tokens` tokens may copy in: 0, 1, 2, 4, ... and n_tokens itself."""
  buckets = [0] + [1 << k for k in range(max(n_tokens - 1, 0).bit_length())]
  return tuple(b for b in buckets if b < n_tokens) + (n_tokens,)


def row_bytes(cache: Mapping[str, jax.Array]) -> int:
  """Bytes of one stored row (every array of the cache but the slot map)."""
  return sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for name, a in cache.items() if name != SLOTS)


def lookup(cache: Mapping[str, jax.Array], tokens: jax.Array, gather: Callable[[jax.Array], Stored]
           ) -> tuple[Stored, dict[str, jax.Array]]:
  """The stored rows of `tokens` (any shape) -> ({name: [*tokens.shape, ...]}, counts); jit-friendly.

  Hits are read from the cache; misses are compacted and fetched by `gather(ids [b]) -> {name: [b, ...]}`,
  which reads the off-device table, for the smallest bucket b of `miss_buckets` holding them (padding slots
  repeat a missed id and are dropped). counts: hit_rows, miss_rows, moved_rows (b) and moved_bytes
  (b x `row_bytes`), int32 scalars.
  """
  flat = tokens.reshape(-1).astype(jnp.int32)
  n = flat.size
  slots = jnp.take(cache[SLOTS], flat, axis=0)
  hit = slots >= 0
  names = [name for name in cache if name != SLOTS]
  if cache[names[0]].shape[0]:
    cached = {name: jnp.take(cache[name], jnp.maximum(slots, 0), axis=0) for name in names}
  else:  # an empty cache: nothing to read, every token misses
    cached = {name: jnp.zeros((n, *cache[name].shape[1:]), cache[name].dtype) for name in names}
  misses = n - jnp.sum(hit, dtype=jnp.int32)
  positions = jnp.nonzero(~hit, size=n, fill_value=n)[0]
  buckets = miss_buckets(n)

  def fetch(b: int) -> Callable[[], Stored]:
    def branch() -> Stored:
      if b == 0:
        return cached
      pos = positions[:b]
      ids = jnp.take(flat, jnp.where(pos < n, pos, positions[0]), axis=0)
      rows = gather(ids)
      return {name: cached[name].at[pos].set(rows[name], mode="drop") for name in names}
    return branch

  index = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), misses)
  rows = jax.lax.switch(index, [fetch(b) for b in buckets])
  moved = jnp.asarray(buckets, jnp.int32)[index]
  counts = {"hit_rows": n - misses, "miss_rows": misses, "moved_rows": moved, "moved_bytes": moved * row_bytes(cache)}
  return {name: r.reshape(*tokens.shape, *r.shape[1:]) for name, r in rows.items()}, counts


def _checked_counts(token_counts: np.ndarray) -> np.ndarray:
  counts = np.asarray(token_counts)
  if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.number) or not np.all(np.isfinite(counts)):
    raise ValueError(f"token_counts must be finite numbers [V], got shape {counts.shape} dtype {counts.dtype}")
  if counts.size and counts.min() < 0:
    raise ValueError(f"token_counts must be >= 0, got a minimum of {counts.min()}")
  return counts


def _check_n_rows(n_rows: int, vocab_size: int) -> None:
  if not isinstance(n_rows, (int, np.integer)) or isinstance(n_rows, bool) or not 0 <= n_rows <= vocab_size:
    raise ValueError(f"n_rows must be an int in [0, vocab_size={vocab_size}], got {n_rows!r}")
