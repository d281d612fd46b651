"""Batches for language-model training: shuffled, resumable, split across processes.

Shapes: B the global batch, B/P one process's share, S sequence length, N packed rows.

A split is tokenised and packed once into host memory (the stdlib corpus is ~11 MB of text, a few
seconds to byte-tokenise), so an epoch is just a permutation of row indices. Batch `b` of epoch `e`
is a pure function of `(seed, e, b)`, which is what makes resuming exact and lets any number of
processes agree on the global batch without talking to each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from pangu.data.corpus import CorpusConfig, Split, load_documents
from pangu.data.packing import PackedRows, loss_mask, pack_documents
from pangu.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class LMDataset:
  """One split of a corpus, tokenised and packed.

  Attributes:
    split: which split of the corpus this is.
    packed: the rows and their real lengths.
    pad_id: fills padded rows; their targets are masked out.
    num_documents: how many documents went into `packed`.
    fingerprint: sha256 of the packed rows: it changes with the corpus, the split, the tokenizer and
      the sequence length, so a saved iterator state can refuse to resume on different data.
  """

  split: Split
  packed: PackedRows
  pad_id: int
  num_documents: int
  fingerprint: str

  def __post_init__(self):
    if self.split not in ("train", "validation"):
      raise ValueError(f"split={self.split!r} must be 'train' or 'validation'")
    if self.pad_id < 0:
      raise ValueError(f"pad_id={self.pad_id} must be non-negative")
    if self.num_documents < 0:
      raise ValueError(f"num_documents={self.num_documents} must be non-negative")

  @classmethod
  def build(
      cls,
      tokenizer: Tokenizer,
      corpus: CorpusConfig,
      *,
      split: Split,
      seq_len: int,
      pad_remainder: bool = False,
  ) -> LMDataset:
    """Reads, tokenises and packs one split; the tail that fills no row is dropped unless padded."""
    documents = load_documents(corpus, split)
    packed = pack_documents(
        (tokenizer.encode(text) for text in documents),
        seq_len,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id if pad_remainder else None,
    )
    digest = hashlib.sha256(repr(packed.rows.shape).encode("ascii"))
    digest.update(packed.rows.tobytes())
    digest.update(packed.lengths.tobytes())
    return cls(
        split=split,
        packed=packed,
        pad_id=tokenizer.pad_id,
        num_documents=len(documents),
        fingerprint=digest.hexdigest(),
    )

  @property
  def seq_len(self) -> int:
    return self.packed.seq_len

  @property
  def num_rows(self) -> int:
    return self.packed.num_rows


def _check_processes(global_batch_size: int, process_index: int, process_count: int) -> int:
  """Returns B/P, the rows each process contributes to a global batch."""
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size={global_batch_size} must be at least 1")
  if process_count < 1:
    raise ValueError(f"process_count={process_count} must be at least 1")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}"
    )
  return global_batch_size // process_count


def _gather(dataset: LMDataset, row_indices: np.ndarray) -> Batch:
  """Builds a batch from row indices; index -1 stands for a filler row that is all padding."""
  real = row_indices >= 0
  safe = np.where(real, row_indices, 0)
  rows = np.where(real[:, None], dataset.packed.rows[safe], dataset.pad_id).astype(np.int32)
  lengths = np.where(real, dataset.packed.lengths[safe], 0)
  return {
      "inputs": np.ascontiguousarray(rows[:, :-1]),
      "targets": np.ascontiguousarray(rows[:, 1:]),
      "mask": loss_mask(lengths, dataset.seq_len),
  }


class BatchIterator:
  """Endless shuffled training batches; `state()`/`restore()` resume exactly where it stopped.

  1. Epoch `e` visits the rows in the order `default_rng((seed, e)).permutation(N)`.
  2. Global batch `b` is the rows at positions [b * B, (b + 1) * B) of that order; the last
     `N mod B` rows of each epoch are skipped, and since the order changes every epoch, a different
     few each time.
  3. Process `p` of `P` yields the contiguous slice [p * B/P, (p + 1) * B/P) of the global batch, so
     concatenating every process's batch gives the single-process batch.

  The state counts global batches, so a run may resume on a different number of processes.
  """

  def __init__(
      self,
      dataset: LMDataset,
      *,
      global_batch_size: int,
      seed: int,
      process_index: int = 0,
      process_count: int = 1,
  ):
    self._local_batch_size = _check_processes(global_batch_size, process_index, process_count)
    if global_batch_size > dataset.num_rows:
      raise ValueError(
          f"global_batch_size={global_batch_size} is larger than the {dataset.num_rows} rows of "
          f"the {dataset.split!r} split at seq_len={dataset.seq_len}; use a smaller batch or more "
          "data"
      )
    if seed < 0:
      raise ValueError(f"seed={seed} must be non-negative")
    self._dataset = dataset
    self._global_batch_size = global_batch_size
    self._seed = seed
    self._process_index = process_index
    self._epoch = 0
    self._batch_index = 0
    self._order_epoch = -1
    self._order = np.zeros([0], np.int64)

  @property
  def batches_per_epoch(self) -> int:
    return self._dataset.num_rows // self._global_batch_size

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if self._order_epoch != epoch:
      rng = np.random.default_rng((self._seed, epoch))
      self._order = rng.permutation(self._dataset.num_rows)
      self._order_epoch = epoch
    return self._order

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    start = (
        self._batch_index * self._global_batch_size
        + self._process_index * self._local_batch_size
    )
    rows = self._epoch_order(self._epoch)[start : start + self._local_batch_size]
    self._batch_index += 1
    if self._batch_index == self.batches_per_epoch:
      self._epoch, self._batch_index = self._epoch + 1, 0
    return _gather(self._dataset, rows)

  def state(self) -> dict[str, Any]:
    """Where the next batch comes from, as JSON-ready values."""
    return {
        "epoch": self._epoch,
        "batch_index": self._batch_index,
        "seed": self._seed,
        "global_batch_size": self._global_batch_size,
        "split": self._dataset.split,
        "fingerprint": self._dataset.fingerprint,
    }

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from `state`, refusing one saved for other data, seed or batch size."""
    expected = self.state()
    missing = sorted(set(expected) - set(state))
    if missing:
      raise ValueError(f"iterator state lacks {missing}; it holds {sorted(state)}")
    for key in ("split", "seed", "global_batch_size"):
      if state[key] != expected[key]:
        raise ValueError(
            f"iterator state was saved with {key}={state[key]!r}, this iterator has "
            f"{key}={expected[key]!r}"
        )
    if state["fingerprint"] != expected["fingerprint"]:
      raise ValueError(
          f"iterator state was saved on data with fingerprint {state['fingerprint']}, this dataset "
          f"has {expected['fingerprint']}: the corpus, tokenizer or seq_len differ"
      )
    epoch, batch_index = state["epoch"], state["batch_index"]
    if epoch < 0 or not 0 <= batch_index < self.batches_per_epoch:
      raise ValueError(
          f"iterator state epoch={epoch}, batch_index={batch_index} is out of range "
          f"(batch_index must be in [0, {self.batches_per_epoch}))"
      )
    self._epoch, self._batch_index = epoch, batch_index


def eval_batches(
    dataset: LMDataset,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_batches: int | None = None,
) -> Iterator[Batch]:
  """The same batches every call: rows in corpus order, each exactly once.

  The last batch is filled up with all-padding rows whose mask is 0, so every batch has the shape
  a compiled eval step expects and a masked mean over all batches weighs every target once.
  `max_batches` keeps only the first batches, for a cheap fixed estimate during training.
  """
  local_batch_size = _check_processes(global_batch_size, process_index, process_count)
  if dataset.num_rows == 0:
    raise ValueError(
        f"the {dataset.split!r} split has no rows at seq_len={dataset.seq_len}; raise "
        "validation_fraction or max_files, or lower seq_len"
    )
  if max_batches is not None and max_batches < 1:
    raise ValueError(f"max_batches={max_batches} must be None or at least 1")
  num_batches = -(-dataset.num_rows // global_batch_size)
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  # The checks above run at the call, not at the first `next`, hence the inner generator.
  def batches() -> Iterator[Batch]:
    for batch_index in range(num_batches):
      start = batch_index * global_batch_size + process_index * local_batch_size
      rows = np.arange(start, start + local_batch_size)
      yield _gather(dataset, np.where(rows < dataset.num_rows, rows, -1))

  return batches()
