import json
import os

import jax
import numpy as np
import pytest

from pangu import models
from pangu.parallel import cpu_mesh
from pangu.train.checkpoint import Checkpointer, CheckpointError, save_replacing
from pangu.train.config import TrainConfig
from pangu.train.step import init_train_state

MODEL = models.tiny()
TRAIN = TrainConfig(warmup_steps=1, total_steps=10)
META = {"model": MODEL, "train": TRAIN}


@pytest.fixture(scope="module")
def mesh():
  return cpu_mesh(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def state(mesh):
  s = init_train_state(MODEL, TRAIN, jax.random.key(3), mesh)
  return s.replace(step=s.step + 5)


def test_round_trip_is_exact_and_keeps_shardings(tmp_path, mesh, state):
  ckpt = Checkpointer(tmp_path, keep=2)
  ckpt.save(state, data_state={"epoch": 1, "batch_index": 7}, metadata=META)
  target = init_train_state(MODEL, TRAIN, jax.random.key(99), mesh)
  restored, data_state = ckpt.restore(target, metadata=META)
  assert data_state == {"epoch": 1, "batch_index": 7}
  assert int(restored.step) == 5
  np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
  for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(got, want)
    assert got.sharding == want.sharding


def test_keeps_only_the_newest_checkpoints(tmp_path, state):
  ckpt = Checkpointer(tmp_path, keep=2)
  for step in (1, 2, 3):
    ckpt.save(state.replace(step=state.step * 0 + step), data_state={}, metadata=META)
  assert ckpt.all_steps() == [2, 3]


def test_mismatched_config_names_the_field(tmp_path, mesh, state):
  Checkpointer(tmp_path).save(state, data_state={}, metadata=META)
  other = MODEL.replace(d_ff=256)
  with pytest.raises(CheckpointError, match="model.d_ff: checkpoint has 128, run has 256"):
    Checkpointer(tmp_path).restore(init_train_state(other, TRAIN, jax.random.key(0), mesh),
                                   metadata={"model": other, "train": TRAIN})


def test_corrupt_checkpoint_is_an_error_not_a_reinit(tmp_path, mesh, state):
  Checkpointer(tmp_path).save(state, data_state={}, metadata=META)
  step_dir = tmp_path / "5" / "state"
  damaged = 0
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 0:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
        damaged += 1
  assert damaged
  with pytest.raises(CheckpointError, match="corrupt"):
    Checkpointer(tmp_path).restore(state, metadata=META)


def test_empty_directory_is_an_error(tmp_path, state):
  with pytest.raises(CheckpointError, match="no checkpoint"):
    Checkpointer(tmp_path).restore(state, metadata=META)


def test_restore_params_reads_the_params_alone_into_the_target_shardings(tmp_path, mesh, state):
  ckpt = Checkpointer(tmp_path)
  ckpt.save(state, data_state={"epoch": 1}, metadata=META)  # the same manager then restores a part of it
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params)
  params = ckpt.restore_params(target)
  assert jax.tree.structure(params) == jax.tree.structure(state.params)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(got, want)
    assert got.sharding == want.sharding
  assert ckpt.metadata()["model"]["d_ff"] == MODEL.d_ff
  wider = init_train_state(MODEL.replace(d_ff=256), TRAIN, jax.random.key(0), mesh).params
  with pytest.raises(CheckpointError, match="checkpoint step 5"):
    ckpt.restore_params(wider)
  with pytest.raises(CheckpointError, match="no checkpoint"):
    Checkpointer(tmp_path / "empty").restore_params(target)


def test_a_checkpoint_from_before_a_new_config_field_restores_at_its_default(tmp_path, mesh, state):
  Checkpointer(tmp_path).save(state, data_state={}, metadata=META)
  [meta_file] = [p for p in (tmp_path / "5").rglob("*") if p.is_file() and b"attention_implementation" in p.read_bytes()]
  stored = json.loads(meta_file.read_text())
  for field in ("attention_implementation", "sliding_window", "attention_logit_softcap"):
    del stored["model"][field]  # as written before these fields existed
  meta_file.write_text(json.dumps(stored))
  restored, _ = Checkpointer(tmp_path).restore(init_train_state(MODEL, TRAIN, jax.random.key(0), mesh), metadata=META)
  assert int(restored.step) == 5
  windowed = MODEL.replace(sliding_window=8)
  with pytest.raises(CheckpointError, match="model.sliding_window: checkpoint has None, run has 8"):
    Checkpointer(tmp_path).restore(init_train_state(windowed, TRAIN, jax.random.key(0), mesh),
                                   metadata={"model": windowed, "train": TRAIN})


def test_save_replacing_replaces_a_checkpoint_at_the_same_step_and_a_failed_save_keeps_it(tmp_path, mesh, state):
  folder = tmp_path / "student"
  other = state.replace(params=jax.tree.map(lambda x: x + 1, state.params))
  for i, s in enumerate((state, other)):  # both at step 5: Checkpointer.save alone refuses the second
    save_replacing(folder, s, data_state={}, metadata={**META, "run": i})
  ckpt = Checkpointer(folder)
  assert ckpt.metadata()["run"] == 1 and ckpt.all_steps() == [5]
  restored = ckpt.restore_params(init_train_state(MODEL, TRAIN, jax.random.key(99), mesh).params)
  ckpt.close()
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(other.params)):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(TypeError):  # metadata that cannot be written
    save_replacing(folder, state, data_state={}, metadata={**META, "run": object()})
  ckpt = Checkpointer(folder)
  assert ckpt.metadata()["run"] == 1
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_save_replacing_puts_the_previous_checkpoint_back_when_the_swap_fails(tmp_path, mesh, state, monkeypatch):
  folder = tmp_path / "student"
  save_replacing(folder, state, data_state={}, metadata={**META, "run": 0})
  real_replace = os.replace

  def failing_swap(src, dst):
    if os.path.basename(src).startswith(".checkpoint-") and os.fspath(dst) == os.fspath(folder):
      raise OSError("swap refused")
    real_replace(src, dst)

  monkeypatch.setattr(os, "replace", failing_swap)
  with pytest.raises(OSError, match="swap refused"):
    save_replacing(folder, state, data_state={}, metadata={**META, "run": 1})
  monkeypatch.undo()
  ckpt = Checkpointer(folder)
  assert ckpt.metadata()["run"] == 0 and ckpt.all_steps() == [5]
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
