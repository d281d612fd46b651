"""Text corpora: the Python standard library by default, or the user's .txt/.jsonl files.

The standard library ships with every Python, so experiments train on real text with no download
and no data licence question. What is included (under `sysconfig.get_paths()["stdlib"]`):

* files ending in `.py`, `.txt` or `.rst`;
* except anything under a folder named `site-packages` or `dist-packages` (installed packages, not
  the library), `test` or `tests` (large generated fixtures, some deliberately malformed),
  `idlelib` (an application, mostly GUI code and changelogs), `__pycache__`, or `config-*` (build
  artefacts).

Files are read as UTF-8 (undecodable bytes replaced) and sorted by their relative POSIX path, so a
given Python build always yields the same documents in the same order; `corpus_fingerprint` records
which build that was. On CPython 3.11 this is about 680 files and 11 MB.

The train/validation split is decided per document by a hash of its name, never by position, so
adding, removing or truncating files (`max_files`) never moves another document between splits. A
stdlib or .txt document is a whole file, so the split is by file and no file straddles both splits;
a .jsonl line is one document named `<file name>:<line number>`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from typing import Literal

Split = Literal["train", "validation"]

_STDLIB_SUFFIXES = (".py", ".txt", ".rst")
_STDLIB_EXCLUDED_FOLDERS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
)
_USER_SUFFIXES = (".txt", ".jsonl")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """Which text to read and how to split it.

  Attributes:
    source: `"stdlib"`, or paths of .txt files (one document each) and .jsonl files (one
      document per non-blank line). A single path may be given as a string.
    text_field: the key holding the document text in each .jsonl record.
    validation_fraction: the expected share of documents in the validation split, in [0, 1).
    max_files: keep only the first N files (stdlib: in sorted order; user files: in the order
      given), for quick runs. The split of each kept file is the same as without the limit.
  """

  source: str | tuple[str, ...] = "stdlib"
  text_field: str = "text"
  validation_fraction: float = 0.02
  max_files: int | None = None

  def __post_init__(self):
    source = self.source
    if isinstance(source, (str, os.PathLike)):
      source = source if source == "stdlib" else (os.fspath(source),)
    else:
      source = tuple(os.fspath(path) for path in source)
      if not source:
        raise ValueError("source=() names no files; use 'stdlib' or give paths")
      for path in source:
        if not path.endswith(_USER_SUFFIXES):
          raise ValueError(f"source file {path!r} must end in one of {_USER_SUFFIXES}")
    object.__setattr__(self, "source", source)
    if not isinstance(self.text_field, str) or not self.text_field:
      raise ValueError(f"text_field={self.text_field!r} must be a non-empty string")
    if not 0.0 <= self.validation_fraction < 1.0:
      raise ValueError(f"validation_fraction={self.validation_fraction} must be in [0, 1)")
    if self.max_files is not None and self.max_files < 1:
      raise ValueError(f"max_files={self.max_files} must be None or at least 1")


@dataclasses.dataclass(frozen=True)
class _SourceFile:
  name: str  # Stable across machines: the stdlib-relative path, or a user file's base name.
  path: str


def stdlib_root() -> str:
  """The standard library folder of the running Python (the base install's, inside a venv)."""
  return sysconfig.get_paths()["stdlib"]


def _stdlib_files() -> list[_SourceFile]:
  root = stdlib_root()
  files = []
  for folder, subfolders, filenames in os.walk(root):
    subfolders[:] = [
        name
        for name in subfolders
        if name not in _STDLIB_EXCLUDED_FOLDERS and not name.startswith("config-")
    ]
    for filename in filenames:
      if filename.endswith(_STDLIB_SUFFIXES):
        path = os.path.join(folder, filename)
        files.append(_SourceFile(os.path.relpath(path, root).replace(os.sep, "/"), path))
  return sorted(files, key=lambda file: file.name)


def _source_files(config: CorpusConfig) -> list[_SourceFile]:
  if config.source == "stdlib":
    files = _stdlib_files()
  else:
    files = [_SourceFile(os.path.basename(path), path) for path in config.source]
    for file in files:
      if not os.path.isfile(file.path):
        raise FileNotFoundError(f"corpus file not found: {file.path!r}")
  return files[: config.max_files]


def _read_text(path: str) -> str:
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace")


def _jsonl_documents(file: _SourceFile, text_field: str) -> Iterator[tuple[str, str]]:
  # Split on "\n" only: str.splitlines would also break at U+2028, which JSON strings may contain.
  for line_number, line in enumerate(_read_text(file.path).split("\n"), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise ValueError(f"{file.path}:{line_number}: invalid JSON ({error.msg})") from error
    if not isinstance(record, dict) or text_field not in record:
      raise ValueError(f"{file.path}:{line_number}: record has no field {text_field!r}")
    text = record[text_field]
    if not isinstance(text, str):
      raise ValueError(
          f"{file.path}:{line_number}: field {text_field!r} is {type(text).__name__}, not a string"
      )
    yield f"{file.name}:{line_number}", text


def document_split(name: str, validation_fraction: float) -> Split:
  """The split of the document called `name`: a pure function of the name, stable forever."""
  digest = hashlib.sha256(name.encode("utf-8")).digest()
  unit = int.from_bytes(digest[:8], "big") / 2.0**64
  return "validation" if unit < validation_fraction else "train"


def named_documents(config: CorpusConfig, split: Split) -> list[tuple[str, str]]:
  """`(name, text)` of each document in one split, in corpus order; the split hashes the name."""
  if split not in ("train", "validation"):
    raise ValueError(f"split={split!r} must be 'train' or 'validation'")

  def in_split(name: str) -> bool:
    return document_split(name, config.validation_fraction) == split

  documents = []
  for file in _source_files(config):
    if file.path.endswith(".jsonl"):
      documents.extend(doc for doc in _jsonl_documents(file, config.text_field) if in_split(doc[0]))
    elif in_split(file.name):  # A whole-file document: skip reading files of the other split.
      documents.append((file.name, _read_text(file.path)))
  return documents


def load_documents(config: CorpusConfig, split: Split) -> list[str]:
  """The texts of one split, in corpus order."""
  return [text for _, text in named_documents(config, split)]


def corpus_fingerprint(config: CorpusConfig) -> str:
  """sha256 over the selected files' names and byte sizes: cheap, and changes with the Python build.

  Record it beside results so a rerun on another machine can tell whether it saw the same text.
  """
  digest = hashlib.sha256()
  for file in _source_files(config):
    digest.update(f"{file.name}\0{os.path.getsize(file.path)}\n".encode("utf-8"))
  return digest.hexdigest()
