"""Corpora: the stdlib listing, the hash split, and user .txt/.jsonl files with their errors."""

import json
import os

import pytest

from pangu.data import (
    CorpusConfig,
    corpus_fingerprint,
    document_split,
    load_documents,
    named_documents,
    stdlib_root,
)


@pytest.fixture(scope="module")
def stdlib_splits():
  config = CorpusConfig()
  return {split: named_documents(config, split) for split in ("train", "validation")}


def test_stdlib_split_is_by_file_disjoint_sorted_and_follows_the_exclusions(stdlib_splits):
  train = [name for name, _ in stdlib_splits["train"]]
  validation = [name for name, _ in stdlib_splits["validation"]]
  assert train == sorted(train) and validation == sorted(validation)
  assert not set(train) & set(validation)
  assert 0 < len(validation) < 0.1 * len(train)
  for name in train + validation:
    folders = name.split("/")[:-1]
    assert name.endswith((".py", ".txt", ".rst")), name
    assert not {"test", "tests", "idlelib", "site-packages", "__pycache__"} & set(folders), name
    assert not any(folder.startswith("config-") for folder in folders), name
  assert "os.py" in train
  with open(os.path.join(stdlib_root(), "os.py"), encoding="utf-8") as f:
    assert dict(stdlib_splits["train"])["os.py"] == f.read()


def test_max_files_takes_a_sorted_prefix_without_moving_files_between_splits(stdlib_splits):
  everything = sorted(
      (name, split) for split, docs in stdlib_splits.items() for name, _ in docs
  )
  limited = CorpusConfig(max_files=150)
  for split in ("train", "validation"):
    expected = [name for name, their_split in everything[:150] if their_split == split]
    assert [name for name, _ in named_documents(limited, split)] == expected


def test_split_is_a_fixed_function_of_the_name():
  # sha256("os.py") read as a fraction is 0.8509...; these pin the scheme against silent change.
  assert document_split("os.py", 0.85) == "train"
  assert document_split("os.py", 0.86) == "validation"
  assert document_split("chunk.py", 0.02) == "validation"
  assert document_split("chunk.py", 0.0) == "train"
  names = [f"doc{i}.txt" for i in range(4000)]
  share = sum(document_split(name, 0.1) == "validation" for name in names) / len(names)
  assert 0.08 < share < 0.12


def test_user_txt_and_jsonl_documents(tmp_path):
  (tmp_path / "a.txt").write_text("whole file\nis one document\n")
  records = [{"text": f"line {i}", "id": i} for i in range(200)]
  lines = [json.dumps(record) for record in records]
  lines.insert(5, "   ")  # Blank lines are skipped but still counted in line numbers.
  (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
  config = CorpusConfig(
      source=(str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")), validation_fraction=0.2
  )
  train = named_documents(config, "train")
  validation = named_documents(config, "validation")
  assert sorted(train + validation) == sorted(
      [("a.txt", "whole file\nis one document\n")]
      + [(f"b.jsonl:{i + 1 + (i >= 5)}", f"line {i}") for i in range(200)]
  )
  assert 10 < len(validation) < 80
  assert load_documents(config, "validation") == [text for _, text in validation]


def test_jsonl_errors_name_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "fine"}\n{"text": \n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
    load_documents(CorpusConfig(source=str(path)), "train")
  path.write_text('{"text": "fine"}\n\n{"body": "no text"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:3: record has no field 'text'"):
    load_documents(CorpusConfig(source=str(path)), "train")
  path.write_text('{"body": 3}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'body' is int"):
    load_documents(CorpusConfig(source=str(path), text_field="body"), "train")


def test_config_and_file_errors(tmp_path):
  with pytest.raises(ValueError, match="notes.csv"):
    CorpusConfig(source=("notes.csv",))
  with pytest.raises(ValueError, match="validation_fraction=1.0"):
    CorpusConfig(validation_fraction=1.0)
  with pytest.raises(ValueError, match="max_files=0"):
    CorpusConfig(max_files=0)
  with pytest.raises(ValueError, match="text_field=''"):
    CorpusConfig(text_field="")
  with pytest.raises(FileNotFoundError, match="absent.txt"):
    load_documents(CorpusConfig(source=str(tmp_path / "absent.txt")), "train")
  with pytest.raises(ValueError, match="split='test'"):
    load_documents(CorpusConfig(max_files=1), "test")


def test_fingerprint_tracks_names_and_sizes(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("abc")
  config = CorpusConfig(source=str(path))
  first = corpus_fingerprint(config)
  assert corpus_fingerprint(config) == first
  path.write_text("abcd")
  assert corpus_fingerprint(config) != first
  assert corpus_fingerprint(CorpusConfig(max_files=3)) != corpus_fingerprint(CorpusConfig())
