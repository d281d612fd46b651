"""Batch iteration: exact resume, process slices that add up to the global batch, fixed eval."""

import collections
import json

import numpy as np
import pytest

from pangu.data import (
    BatchIterator,
    ByteTokenizer,
    CorpusConfig,
    LMDataset,
    eval_batches,
    load_documents,
)

SEQ_LEN = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  folder = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "épsilon", "ζήτα"]
  lines = [
      json.dumps({"text": " ".join(rng.choice(words, size=rng.integers(1, 30)))})
      for _ in range(300)
  ]
  (folder / "docs.jsonl").write_text("\n".join(lines))
  return CorpusConfig(source=str(folder / "docs.jsonl"), validation_fraction=0.1)


@pytest.fixture(scope="module")
def train(corpus):
  return LMDataset.build(ByteTokenizer(), corpus, split="train", seq_len=SEQ_LEN)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same(batches, others):
  assert len(batches) == len(others)
  for batch, other in zip(batches, others):
    assert batch.keys() == other.keys()
    for key in batch:
      np.testing.assert_array_equal(batch[key], other[key])


def test_batches_have_the_promised_shapes_and_shifted_targets(train):
  batch = next(BatchIterator(train, global_batch_size=8, seed=0))
  assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (8, SEQ_LEN)
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
  assert batch["mask"].dtype == np.float32 and (batch["mask"] == 1).all()
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_an_epoch_visits_distinct_rows_and_the_next_epoch_reshuffles(train):
  iterator = BatchIterator(train, global_batch_size=8, seed=3)
  per_epoch = iterator.batches_per_epoch
  rows = collections.Counter(tuple(row) for row in train.packed.rows.tolist())
  epochs = [_take(iterator, per_epoch) for _ in range(2)]
  first = [
      (*inputs, targets[-1])
      for batch in epochs[0]
      for inputs, targets in zip(batch["inputs"].tolist(), batch["targets"].tolist())
  ]
  # Rows repeat in this small-vocabulary corpus, so compare multisets: no row is drawn twice.
  assert len(first) == per_epoch * 8 and collections.Counter(first) <= rows
  assert iterator.state()["epoch"] == 2
  assert not np.array_equal(epochs[0][0]["inputs"], epochs[1][0]["inputs"])


@pytest.mark.parametrize("stop", [0, 1, 5, 17, 40])
def test_restore_continues_exactly_like_an_uninterrupted_run(train, stop):
  # 40 batches of 8 cross the epoch boundary at least once on this corpus.
  uninterrupted = _take(BatchIterator(train, global_batch_size=8, seed=11), stop + 12)
  first = BatchIterator(train, global_batch_size=8, seed=11)
  _take(first, stop)
  state = json.loads(json.dumps(first.state()))
  resumed = BatchIterator(train, global_batch_size=8, seed=11)
  resumed.restore(state)
  _assert_same(_take(resumed, 12), uninterrupted[stop:])


@pytest.mark.parametrize("process_count", [1, 2, 4, 8])
def test_process_slices_concatenate_to_the_global_batch(train, process_count):
  single = _take(BatchIterator(train, global_batch_size=8, seed=5), 30)
  shards = [
      _take(
          BatchIterator(
              train,
              global_batch_size=8,
              seed=5,
              process_index=index,
              process_count=process_count,
          ),
          30,
      )
      for index in range(process_count)
  ]
  for step, batch in enumerate(single):
    for key in batch:
      joined = np.concatenate([shard[step][key] for shard in shards])
      np.testing.assert_array_equal(joined, batch[key])


def test_state_resumes_on_a_different_process_count(train):
  uninterrupted = _take(BatchIterator(train, global_batch_size=8, seed=2), 10)
  first = BatchIterator(train, global_batch_size=8, seed=2)
  _take(first, 6)
  second_half = BatchIterator(train, global_batch_size=8, seed=2, process_index=1, process_count=2)
  second_half.restore(first.state())
  for step in range(6, 10):
    np.testing.assert_array_equal(next(second_half)["inputs"], uninterrupted[step]["inputs"][4:])


def test_restore_refuses_other_data_seed_or_batch(corpus, train):
  state = BatchIterator(train, global_batch_size=8, seed=0).state()
  with pytest.raises(ValueError, match="seed=0, this iterator has seed=1"):
    BatchIterator(train, global_batch_size=8, seed=1).restore(state)
  with pytest.raises(ValueError, match="size=8, this iterator has global_batch_size=4"):
    BatchIterator(train, global_batch_size=4, seed=0).restore(state)
  longer = LMDataset.build(ByteTokenizer(), corpus, split="train", seq_len=SEQ_LEN + 1)
  with pytest.raises(ValueError, match="corpus, tokenizer or seq_len differ"):
    BatchIterator(longer, global_batch_size=8, seed=0).restore(state)
  with pytest.raises(ValueError, match="lacks \\['fingerprint'\\]"):
    BatchIterator(train, global_batch_size=8, seed=0).restore(
        {key: value for key, value in state.items() if key != "fingerprint"}
    )
  with pytest.raises(ValueError, match="batch_index=100000 is out of range"):
    BatchIterator(train, global_batch_size=8, seed=0).restore({**state, "batch_index": 100000})


def test_batch_size_errors(train):
  with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by process_count=4"):
    BatchIterator(train, global_batch_size=6, seed=0, process_count=4)
  too_many = train.num_rows + 1
  with pytest.raises(ValueError, match=f"larger than the {train.num_rows} rows"):
    BatchIterator(train, global_batch_size=too_many, seed=0)
  with pytest.raises(ValueError, match="process_index=2"):
    BatchIterator(train, global_batch_size=4, seed=0, process_index=2, process_count=2)


def test_eval_batches_are_fixed_cover_every_row_once_and_mask_the_filler(corpus):
  validation = LMDataset.build(ByteTokenizer(), corpus, split="validation", seq_len=SEQ_LEN)
  assert validation.num_rows % 8  # So the last batch needs filler rows.
  batches = list(eval_batches(validation, global_batch_size=8))
  _assert_same(batches, list(eval_batches(validation, global_batch_size=8)))
  assert len(batches) == -(-validation.num_rows // 8)
  inputs = np.concatenate([batch["inputs"] for batch in batches])
  mask = np.concatenate([batch["mask"] for batch in batches])
  np.testing.assert_array_equal(inputs[: validation.num_rows], validation.packed.rows[:, :-1])
  assert (mask[: validation.num_rows] == 1).all() and (mask[validation.num_rows :] == 0).all()
  halves = [
      list(eval_batches(validation, global_batch_size=8, process_index=index, process_count=2))
      for index in range(2)
  ]
  for step, batch in enumerate(batches):
    joined = np.concatenate([halves[0][step]["targets"], halves[1][step]["targets"]])
    np.testing.assert_array_equal(joined, batch["targets"])
  assert len(list(eval_batches(validation, global_batch_size=8, max_batches=1))) == 1


def test_padded_remainder_reaches_the_mask(corpus):
  padded = LMDataset.build(
      ByteTokenizer(), corpus, split="validation", seq_len=SEQ_LEN, pad_remainder=True
  )
  dropped = LMDataset.build(ByteTokenizer(), corpus, split="validation", seq_len=SEQ_LEN)
  assert padded.num_rows == dropped.num_rows + 1 and padded.packed.dropped_tokens == 0
  last = list(eval_batches(padded, global_batch_size=padded.num_rows))[0]
  real_targets = dropped.packed.dropped_tokens - 1
  np.testing.assert_array_equal(last["mask"][-1], np.arange(SEQ_LEN) < real_targets)


def test_empty_validation_split_is_a_clear_error(corpus):
  tiny = LMDataset.build(ByteTokenizer(), corpus, split="validation", seq_len=100_000)
  with pytest.raises(ValueError, match="'validation' split has no rows at seq_len=100000"):
    eval_batches(tiny, global_batch_size=1)


def test_stdlib_smoke():
  config = CorpusConfig(max_files=20)
  tokenizer = ByteTokenizer()
  dataset = LMDataset.build(tokenizer, config, split="train", seq_len=128)
  assert dataset.num_documents == len(load_documents(config, "train")) > 10
  assert load_documents(config, "train")[0].startswith(tokenizer.decode(dataset.packed.rows[0]))
  batch = next(BatchIterator(dataset, global_batch_size=4, seed=0))
  assert batch["inputs"].shape == (4, 128)
