"""Packing keeps every token in order, drops or pads only the tail, and masks only padding."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pangu.data import PackedRows, loss_mask, pack_documents

EOS = 1000
PAD = 1001

documents = st.lists(st.lists(st.integers(0, 999), max_size=40), max_size=12)


def _stream(docs):
  return [token for doc in docs for token in [*doc, EOS]]


@given(docs=documents, seq_len=st.integers(1, 16))
def test_packing_preserves_the_stream_except_the_dropped_tail(docs, seq_len):
  packed = pack_documents([np.array(d, np.int64) for d in docs], seq_len, eos_id=EOS)
  stream = _stream(docs)
  assert packed.rows.dtype == np.int32
  assert packed.rows.shape == (len(stream) // (seq_len + 1), seq_len + 1)
  assert packed.dropped_tokens == len(stream) % (seq_len + 1)
  kept = len(stream) - packed.dropped_tokens
  assert packed.rows.reshape(-1).tolist() == stream[:kept]
  assert (packed.lengths == seq_len + 1).all()
  assert loss_mask(packed.lengths, seq_len).all()


@given(docs=documents, seq_len=st.integers(1, 16))
def test_padding_keeps_the_tail_and_masks_exactly_the_padded_targets(docs, seq_len):
  packed = pack_documents([np.array(d) for d in docs], seq_len, eos_id=EOS, pad_id=PAD)
  stream = _stream(docs)
  assert packed.dropped_tokens == 0
  assert packed.rows.shape[0] == -(-len(stream) // (seq_len + 1))
  flat = packed.rows.reshape(-1).tolist()
  assert flat[: len(stream)] == stream
  assert set(flat[len(stream) :]) <= {PAD}
  mask = loss_mask(packed.lengths, seq_len)
  # Every row's first token is an input only; every other real token is a target once.
  assert mask.sum() == len(stream) - packed.rows.shape[0]
  targets = packed.rows[:, 1:]
  assert (targets[mask == 0] == PAD).all()


def test_worked_example():
  packed = pack_documents([np.array([5, 6, 7]), np.array([8])], 2, eos_id=0, pad_id=9)
  # Stream 5 6 7 0 8 0 -> rows of three.
  np.testing.assert_array_equal(packed.rows, [[5, 6, 7], [0, 8, 0]])
  dropped = pack_documents([np.array([5, 6, 7]), np.array([8, 4])], 2, eos_id=0)
  assert dropped.dropped_tokens == 1  # The final EOS.
  padded = pack_documents([np.array([5, 6, 7]), np.array([8, 4])], 2, eos_id=0, pad_id=9)
  np.testing.assert_array_equal(padded.rows[-1], [0, 9, 9])
  np.testing.assert_array_equal(loss_mask(padded.lengths, 2), [[1, 1], [1, 1], [0, 0]])


def test_packing_rejects_bad_input():
  with pytest.raises(ValueError, match="seq_len=0"):
    pack_documents([np.array([1])], 0, eos_id=EOS)
  with pytest.raises(ValueError, match="document 1 has shape"):
    pack_documents([np.array([1]), np.ones([2, 2])], 4, eos_id=EOS)
  with pytest.raises(ValueError, match="lengths must be int32"):
    PackedRows(rows=np.zeros([2, 3], np.int32), lengths=np.zeros([3], np.int32), dropped_tokens=0)
