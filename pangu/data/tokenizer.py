"""Tokenizers behind one small protocol, so the loader never cares which one it was given.

`ByteTokenizer` needs no files and no training, which keeps every experiment runnable offline;
`HFTokenizer` wraps a `tokenizer.json` from the `tokenizers` library for real vocabularies.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import tokenizers

# Tried in order when a tokenizer.json does not say which tokens are special. They cover the
# SentencePiece, BERT, GPT-2 and Llama-3 conventions.
_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
_EOS_NAMES = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer: ids in, ids out, three special ids."""

  @property
  def vocab_size(self) -> int: ...

  @property
  def bos_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  def encode(self, text: str) -> np.ndarray:
    """Returns int32 [T] ids of `text`, without any special tokens added."""
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Returns the text of `ids`, skipping special tokens."""
    ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then BOS=256, EOS=257, PAD=258.

  Lossless on any text and needs no vocabulary file; the price is ~4x longer sequences than a
  trained BPE on English, which is fine for the small models this repository trains on CPU.
  """

  @property
  def vocab_size(self) -> int:
    return 259

  @property
  def bos_id(self) -> int:
    return 256

  @property
  def eos_id(self) -> int:
    return 257

  @property
  def pad_id(self) -> int:
    return 258

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    # A model can emit a byte sequence that is not valid UTF-8; show it rather than fail.
    data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")


class HFTokenizer:
  """A `tokenizers.Tokenizer` with the special ids the packer and the model need."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_id: int, eos_id: int, pad_id: int):
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
      if not 0 <= value < vocab_size:
        raise ValueError(f"{name}={value} is outside the vocabulary [0, {vocab_size})")
    self._tokenizer = tokenizer
    self._vocab_size = vocab_size
    self._bos_id = bos_id
    self._eos_id = eos_id
    self._pad_id = pad_id

  @classmethod
  def from_file(
      cls,
      path: str | os.PathLike[str],
      *,
      bos_token: str | None = None,
      eos_token: str | None = None,
      pad_token: str | None = None,
  ) -> HFTokenizer:
    """Loads a tokenizer.json; special tokens are the ones named, else the first common name found.

    EOS is required (documents are separated by it). A missing BOS falls back to EOS, as in GPT-2; a
    missing PAD falls back to EOS too, which is safe because loss masks are positional (see
    `packing.loss_mask`), never computed by comparing ids with `pad_id`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path!r}")
    try:
      tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as error:  # The Rust side raises a bare Exception for every parse error.
      raise ValueError(f"{path!r} is not a valid tokenizer.json: {error}") from error

    def find(role: str, given: str | None, candidates: tuple[str, ...]) -> int | None:
      if given is not None:
        token_id = tokenizer.token_to_id(given)
        if token_id is None:
          raise ValueError(f"{role}_token={given!r} is not in the vocabulary of {path!r}")
        return token_id
      for name in candidates:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
          return token_id
      return None

    eos_id = find("eos", eos_token, _EOS_NAMES)
    if eos_id is None:
      raise ValueError(
          f"{path!r} has none of the usual end-of-sequence tokens {_EOS_NAMES}; pass eos_token="
      )
    bos_id = find("bos", bos_token, _BOS_NAMES)
    pad_id = find("pad", pad_token, _PAD_NAMES)
    return cls(
        tokenizer,
        bos_id=eos_id if bos_id is None else bos_id,
        eos_id=eos_id,
        pad_id=eos_id if pad_id is None else pad_id,
    )

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def bos_id(self) -> int:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def pad_id(self) -> int:
    return self._pad_id

  def encode(self, text: str) -> np.ndarray:
    ids = self._tokenizer.encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
    return self._tokenizer.decode(ids, skip_special_tokens=True)


def load_tokenizer(spec: str) -> Tokenizer:
  """`"byte"`, a tokenizer.json, or a folder holding one: the form flags and configs use."""
  if spec == "byte":
    return ByteTokenizer()
  path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"tokenizer spec {spec!r} is neither 'byte' nor a tokenizer.json (looked for {path!r})"
    )
  return HFTokenizer.from_file(path)
