"""Packing documents into fixed-length rows for next-token prediction.

Shapes: N rows, S sequence length, T tokens. A row holds S + 1 tokens so that one row gives both
the inputs `row[:-1]` and the targets `row[1:]`; rows do not overlap, so every kept token is an
input once and a target at most once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """The packed token stream and what was lost or padded on the way.

  Attributes:
    rows: int32 [N, S + 1]: documents back to back, each followed by EOS.
    lengths: int32 [N]: how many leading tokens of each row are real; S + 1 for all rows but a
      padded last one. `loss_mask` turns this into the per-target mask.
    dropped_tokens: tokens at the end of the stream that did not fill a row and were not padded.
  """

  rows: np.ndarray
  lengths: np.ndarray
  dropped_tokens: int

  def __post_init__(self):
    rows, lengths = self.rows, self.lengths
    if rows.ndim != 2 or rows.shape[1] < 2 or rows.dtype != np.int32:
      raise ValueError(f"rows must be int32 [N, S + 1] with S >= 1, got {rows.dtype} {rows.shape}")
    if lengths.shape != rows.shape[:1] or lengths.dtype != np.int32:
      raise ValueError(
          f"lengths must be int32 [{rows.shape[0]}], got {lengths.dtype} {lengths.shape}"
      )
    if self.dropped_tokens < 0:
      raise ValueError(f"dropped_tokens={self.dropped_tokens} must be non-negative")

  @property
  def seq_len(self) -> int:
    return self.rows.shape[1] - 1

  @property
  def num_rows(self) -> int:
    return self.rows.shape[0]


def pack_documents(
    token_arrays: Iterable[np.ndarray],
    seq_len: int,
    *,
    eos_id: int,
    pad_id: int | None = None,
) -> PackedRows:
  """Concatenates documents, each followed by `eos_id`, and cuts the stream into rows of S + 1.

  Packing wastes no compute on padding and lets attention cross document boundaries, which is the
  usual pretraining trade-off: EOS tells the model where one document ends.

  The tail shorter than a row is dropped and counted in `dropped_tokens` (at most S tokens, so at
  most one row's worth of text per split). With `pad_id` given, the tail is instead padded with it
  into one last row whose padded targets `loss_mask` zeroes.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be at least 1")
  eos = np.asarray([eos_id], dtype=np.int32)
  pieces = []
  for index, tokens in enumerate(token_arrays):
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
      raise ValueError(f"document {index} has shape {tokens.shape}; token arrays must be 1-D")
    pieces.extend((tokens.astype(np.int32, copy=False), eos))
  stream = np.concatenate(pieces) if pieces else np.zeros([0], np.int32)

  width = seq_len + 1
  num_full, tail = divmod(stream.size, width)
  rows = stream[: num_full * width].reshape(num_full, width)
  lengths = np.full([num_full], width, dtype=np.int32)
  if pad_id is None or tail == 0:
    return PackedRows(rows=rows, lengths=lengths, dropped_tokens=tail)
  last = np.full([1, width], pad_id, dtype=np.int32)
  last[0, :tail] = stream[num_full * width :]
  return PackedRows(
      rows=np.concatenate([rows, last]),
      lengths=np.append(lengths, np.int32(tail)),
      dropped_tokens=0,
  )


def loss_mask(lengths: np.ndarray, seq_len: int) -> np.ndarray:
  """float32 [N, S]: 1 where the target `row[j + 1]` is a real token, 0 where it is padding.

  Computed from positions rather than by comparing ids with `pad_id`, so a tokenizer whose pad id
  equals its EOS id still learns to predict EOS.
  """
  positions = np.arange(1, seq_len + 1, dtype=np.int32)
  return (positions[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
