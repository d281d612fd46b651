"""Checkpoints of the full training state (the only Orbax import in the package).

A checkpoint holds the TrainState (params, AdamW state, step, RNG, spike detector), the data iterator's
position and the configs that produced it. Serving reads the params alone (`restore_params`), never allocating
the optimizer moments (twice the params for AdamW). Orbax writes each step to a temporary folder and renames it when
complete, so a crash mid-save leaves the previous checkpoints intact. Restoring checks the stored configs
against the caller's and names every field that differs, and any read failure is raised as
`CheckpointError` naming the folder: a bad checkpoint never turns into a silent re-initialisation. A config field
added after a checkpoint was written is no difference while the run keeps the field's default: the checkpoint
was made by a model that behaved as that default does (e.g. `attention_implementation="auto"`).
"""

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import orbax.checkpoint as ocp

_STATE, _DATA, _META = "state", "data", "meta"


class CheckpointError(RuntimeError):
  """A checkpoint is corrupt, incomplete or does not match the run restoring it."""


def _to_json(obj: Any) -> Any:
  if dataclasses.is_dataclass(obj):
    return {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, (list, tuple)):
    return [_to_json(x) for x in obj]
  if isinstance(obj, dict):
    return {str(k): _to_json(v) for k, v in obj.items()}
  return obj


_NO_DEFAULT = object()


def _defaults(obj: Any) -> Any:
  """`_to_json`'s structure with each dataclass field's JSON default (or _NO_DEFAULT) in place of its value."""
  if dataclasses.is_dataclass(obj):
    out = {}
    for f in dataclasses.fields(obj):
      default = (f.default if f.default is not dataclasses.MISSING else
                 f.default_factory() if f.default_factory is not dataclasses.MISSING else _NO_DEFAULT)
      nested = _defaults(getattr(obj, f.name))
      out[f.name] = nested if isinstance(nested, dict) else _to_json(default)
    return out
  if isinstance(obj, dict):
    return {str(k): _defaults(v) for k, v in obj.items()}
  return _NO_DEFAULT


def _differences(stored: Any, expected: Any, defaults: Any, prefix: str = "") -> list[str]:
  if isinstance(stored, dict) and isinstance(expected, dict):
    out = []
    defaults = defaults if isinstance(defaults, dict) else {}
    for key in sorted(set(stored) | set(expected)):
      if key not in stored and expected[key] == defaults.get(key, _NO_DEFAULT):
        continue  # a field newer than the checkpoint, at its default
      out += _differences(stored.get(key), expected.get(key), defaults.get(key),
                          f"{prefix}.{key}" if prefix else key)
    return out
  return [] if stored == expected else [f"{prefix}: checkpoint has {stored!r}, run has {expected!r}"]


def _raw_keys(state):
  return state.replace(rng=jax.random.key_data(state.rng))


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with the sharding, where there is one) of a tree of arrays or structs."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _check_arrays(restored: Any, abstract: Any, where: str) -> None:
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    if got.shape != want.shape or got.dtype != want.dtype:
      raise CheckpointError(f"{where} holds an array of {got.shape} {got.dtype}, expected {want.shape} {want.dtype}")


class Checkpointer:
  """Saves and restores TrainStates under `directory`, keeping the newest `keep` steps."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3):
    if keep < 1:
      raise ValueError(f"Checkpointer keep must be >= 1, got {keep!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, state, *, data_state: dict, metadata: dict) -> None:
    """Saves at step `state.step`; `metadata` (configs) is stored as JSON and checked on restore."""
    step = int(state.step)
    self._manager.save(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(_raw_keys(state)),
        _DATA: ocp.args.JsonSave(_to_json(data_state)),
        _META: ocp.args.JsonSave(_to_json(metadata))}), force=True)
    self._manager.wait_until_finished()

  def restore(self, target_state, *, metadata: dict, step: int | None = None) -> tuple[Any, dict]:
    """Restores into the shardings of `target_state` (arrays or ShapeDtypeStructs with .sharding).

    Returns (state, data_state). Raises CheckpointError if nothing is there, if the stored configs differ
    from `metadata`, or if the arrays cannot be read into the target's structure and shapes.
    """
    step, where = self._step(step)
    diffs = _differences(self.metadata(step), json.loads(json.dumps(_to_json(metadata))), _defaults(metadata))
    if diffs:
      raise CheckpointError(f"{where} does not match this run:\n  " + "\n  ".join(diffs))
    abstract = _abstract(_raw_keys(target_state))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract), _DATA: ocp.args.JsonRestore()}))
    except Exception as e:
      raise CheckpointError(f"{where} is corrupt or does not fit the model's parameter tree: {e}") from e
    state = restored[_STATE]
    _check_arrays(state, abstract, where)
    return state.replace(rng=jax.random.wrap_key_data(state.rng)), restored[_DATA]

  def metadata(self, step: int | None = None) -> dict:
    """The configs stored with a step (the newest by default) as JSON-decoded dicts."""
    step, where = self._step(step)
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    except Exception as e:  # Orbax raises several types for missing / unreadable files.
      raise CheckpointError(f"{where} is corrupt or incomplete: cannot read its metadata ({e})") from e

  def restore_params(self, target_params: Any, *, step: int | None = None) -> Any:
    """Only the params of a step, restored into the shardings of `target_params` (arrays or
    ShapeDtypeStructs with .sharding); the optimizer state and the rest are not read."""
    step, where = self._step(step)
    abstract = _abstract(target_params)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract)
    # A fresh manager: this one may already hold the full-state handler for the state item.
    manager = ocp.CheckpointManager(self.directory)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.PyTreeRestore(
          item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True)}))
    except Exception as e:
      raise CheckpointError(f"{where} is corrupt or does not fit the model's parameter tree: {e}") from e
    finally:
      manager.close()
    params = restored[_STATE]["params"]
    if jax.tree.structure(params) != jax.tree.structure(abstract):
      raise CheckpointError(f"{where} holds params of another structure than the model's")
    _check_arrays(params, abstract, where)
    return params

  def _step(self, step: int | None) -> tuple[int, str]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    return step, f"checkpoint step {step} in {self.directory}"

  def close(self) -> None:
    self._manager.close()


def save_replacing(directory: str | os.PathLike, state, *, data_state: dict, metadata: dict) -> None:
  """Saves `state` as the only checkpoint in `directory`, replacing what was there (a rerun's checkpoint at the
  same step included, which `Checkpointer.save` refuses). It is written into a temporary sibling folder and
  swapped in, so a save that fails leaves the previous checkpoint whole."""
  json.dumps(_to_json([data_state, metadata]))  # unwritable configs fail here, before Orbax starts its writers
  directory = os.path.abspath(os.fspath(directory))
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".checkpoint-", dir=parent)
  try:
    checkpointer = Checkpointer(staging, keep=1)
    try:
      checkpointer.save(state, data_state=data_state, metadata=metadata)
    finally:
      checkpointer.close()  # before removing its folder: Orbax's writer threads stop here
    old = None
    if os.path.exists(directory):
      old = tempfile.mkdtemp(prefix=".checkpoint-old-", dir=parent)
      os.replace(directory, os.path.join(old, "checkpoint"))
    try:
      os.replace(staging, directory)
    except BaseException:
      if old is not None:  # the swap failed: the previous checkpoint goes back where it was
        os.replace(os.path.join(old, "checkpoint"), directory)
        os.rmdir(old)
      raise
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old)
