"""The hot-row cache returns exactly the table's rows and counts what it moves, for every table format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu.nn import hot_rows, lookup_table

V, L, N, D = 37, 2, 3, 8
N_ROWS = 9
# Distinct counts, so the hot set is unambiguous: the N_ROWS tokens with the largest counts.
COUNTS = np.random.default_rng(0).permutation(V).astype(np.float64) ** 2
HOT = np.flatnonzero(COUNTS >= np.sort(COUNTS)[-N_ROWS])
COLD = np.setdiff1d(np.arange(V), HOT)


def _stored(table_format: str) -> dict[str, np.ndarray]:
  table = np.random.default_rng(1).normal(size=(V, L, N, D)).astype(np.float32)
  return lookup_table.encode_table(table, table_format)


def _bucket(misses: int, n_tokens: int) -> int:
  """The rows a call copies in: none, else the next power of two of the misses, at most every token."""
  return 0 if misses == 0 else min(n_tokens, 1 << int(np.ceil(np.log2(misses))))


def _tokens(kind: str) -> np.ndarray:
  rng = np.random.default_rng({"hit": 2, "miss": 3, "mixed": 4}[kind])
  pool = {"hit": HOT, "miss": COLD, "mixed": np.arange(V)}[kind]
  return rng.choice(pool, size=(3, 5)).astype(np.int32)


@jax.jit
def _lookup(cache, host, tokens):
  return hot_rows.lookup(cache, tokens, lambda ids: {k: jnp.take(v, ids, axis=0) for k, v in host.items()})


@pytest.mark.parametrize("table_format", lookup_table.TABLE_FORMATS)
def test_lookup_returns_the_table_rows_bitwise(table_format):
  stored = _stored(table_format)
  cache = hot_rows.build_cache(stored, COUNTS, N_ROWS)
  assert sorted(np.flatnonzero(cache[hot_rows.SLOTS] >= 0)) == sorted(HOT)
  for kind in ("hit", "miss", "mixed"):
    tokens = _tokens(kind)
    rows, _ = _lookup(cache, stored, tokens)
    assert set(rows) == set(stored)
    for name, array in stored.items():
      np.testing.assert_array_equal(np.asarray(rows[name]), array[tokens], err_msg=f"{kind} {name}")


@pytest.mark.parametrize("n_rows", [0, N_ROWS, V])
def test_counts_equal_a_numpy_count(n_rows):
  stored = _stored("int8")
  cache = hot_rows.build_cache(stored, COUNTS, n_rows)
  hot = np.flatnonzero(COUNTS >= np.sort(COUNTS)[-n_rows]) if n_rows else np.array([], np.int64)
  row_bytes = L * N * D + 4 * L * N  # int8 values and one float32 scale per D-vector
  for kind in ("hit", "miss", "mixed"):
    tokens = _tokens(kind)
    _, counts = _lookup(cache, stored, tokens)
    misses = int(np.sum(~np.isin(tokens, hot)))
    moved = _bucket(misses, tokens.size)
    assert {k: int(v) for k, v in counts.items()} == {
        "hit_rows": tokens.size - misses, "miss_rows": misses, "moved_rows": moved,
        "moved_bytes": moved * row_bytes}, kind


def test_buckets_cover_every_miss_count():
  assert hot_rows.miss_buckets(1) == (0, 1)
  assert hot_rows.miss_buckets(16) == (0, 1, 2, 4, 8, 16)
  assert hot_rows.miss_buckets(17) == (0, 1, 2, 4, 8, 16, 17)
  for n in (1, 5, 16, 17):
    for misses in range(n + 1):
      assert min(b for b in hot_rows.miss_buckets(n) if b >= misses) == _bucket(misses, n)


def test_hot_tokens_are_the_most_frequent_first():
  ids = hot_rows.hot_token_ids(COUNTS, N_ROWS)
  assert sorted(ids) == sorted(HOT)
  assert np.all(np.diff(COUNTS[ids]) < 0)
  np.testing.assert_array_equal(hot_rows.hot_token_ids(np.array([1, 3, 3, 0]), 2), [1, 2])  # ties: smaller id


@pytest.mark.parametrize("n_rows, counts, match", [
    (V + 1, COUNTS, "n_rows must be an int in \\[0, vocab_size=37\\], got 38"),
    (-1, COUNTS, "n_rows must be an int in \\[0, vocab_size=37\\], got -1"),
    (2.5, COUNTS, "n_rows must be an int"),
    (2, -COUNTS, "token_counts must be >= 0"),
    (2, COUNTS[:-1], "token_counts has 36 entries, the table 37 rows"),
    (2, np.full(V, np.nan), "token_counts must be finite"),
])
def test_bad_inputs_name_the_field(n_rows, counts, match):
  with pytest.raises(ValueError, match=match):
    hot_rows.build_cache(_stored("float32"), counts, n_rows)
