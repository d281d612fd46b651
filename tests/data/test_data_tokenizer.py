"""Tokenizers: byte round trips, and a tokenizer.json built here with the `tokenizers` library."""

import json

import numpy as np
import pytest
import tokenizers
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import models, pre_tokenizers, trainers

from pangu.data import ByteTokenizer, HFTokenizer, load_tokenizer


@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
  tokenizer = ByteTokenizer()
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32
  assert ids.tolist() == list(text.encode("utf-8"))
  assert tokenizer.decode(ids) == text


def test_byte_tokenizer_decode_skips_specials_and_replaces_broken_utf8():
  tokenizer = ByteTokenizer()
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (256, 257, 258)
  assert tokenizer.vocab_size == 259
  ids = [tokenizer.bos_id, *"hé".encode("utf-8"), tokenizer.eos_id, tokenizer.pad_id]
  assert tokenizer.decode(ids) == "hé"
  assert tokenizer.decode([0xC3]) == "\ufffd"  # A lone lead byte of a two-byte character.


def _write_word_level(path, special_tokens):
  tokenizer = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", *special_tokens])
  tokenizer.train_from_iterator(["the cat sat on the mat", "a dog ran"], trainer)
  tokenizer.save(str(path))
  return tokenizer


def test_hf_tokenizer_finds_common_special_names_and_round_trips(tmp_path):
  path = tmp_path / "tokenizer.json"
  reference = _write_word_level(path, ["<pad>", "<s>", "</s>"])
  tokenizer = HFTokenizer.from_file(path)
  assert tokenizer.vocab_size == reference.get_vocab_size()
  assert tokenizer.pad_id == reference.token_to_id("<pad>")
  assert tokenizer.bos_id == reference.token_to_id("<s>")
  assert tokenizer.eos_id == reference.token_to_id("</s>")
  ids = tokenizer.encode("the cat ran")
  assert ids.dtype == np.int32
  assert ids.tolist() == reference.encode("the cat ran").ids
  assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id]) == "the cat ran"


def test_hf_tokenizer_named_tokens_and_eos_fallbacks(tmp_path):
  path = tmp_path / "tokenizer.json"
  reference = _write_word_level(path, ["<|endoftext|>", "<END>"])
  # GPT-2 style: only an end-of-text token, which then also serves as BOS and PAD.
  tokenizer = HFTokenizer.from_file(path)
  end_of_text = reference.token_to_id("<|endoftext|>")
  assert tokenizer.eos_id == tokenizer.bos_id == tokenizer.pad_id == end_of_text
  assert HFTokenizer.from_file(path, eos_token="<END>").eos_id == reference.token_to_id("<END>")
  with pytest.raises(ValueError, match="eos_token='<nope>'"):
    HFTokenizer.from_file(path, eos_token="<nope>")


def test_hf_tokenizer_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.json"):
    HFTokenizer.from_file(tmp_path / "missing.json")
  malformed = tmp_path / "malformed.json"
  malformed.write_text(json.dumps({"model": "not a model"}))
  with pytest.raises(ValueError, match="malformed.json.*not a valid tokenizer.json"):
    HFTokenizer.from_file(malformed)
  no_eos = tmp_path / "no_eos.json"
  _write_word_level(no_eos, [])
  with pytest.raises(ValueError, match="pass eos_token="):
    HFTokenizer.from_file(no_eos)


def test_load_tokenizer_accepts_byte_file_or_folder(tmp_path):
  assert isinstance(load_tokenizer("byte"), ByteTokenizer)
  _write_word_level(tmp_path / "tokenizer.json", ["</s>"])
  from_folder = load_tokenizer(str(tmp_path))
  from_file = load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert from_folder.encode("a dog").tolist() == from_file.encode("a dog").tolist()
  with pytest.raises(FileNotFoundError, match="neither 'byte' nor a tokenizer.json"):
    load_tokenizer(str(tmp_path / "elsewhere"))
