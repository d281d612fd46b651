"""The training loop: init or resume, step, log, checkpoint. Experiments and scripts all call `train`.

A run's work is never lost: with a checkpoint folder the loop saves every `save_every` steps, after the last
step, and when SIGTERM or SIGINT arrives (a scheduler's preemption, Ctrl-C), after which it finishes the
current step, saves and returns early; rerunning resumes from there. Saving is collective, so in a
multi-process run every process must get the signal (schedulers signal them all).
"""

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from pangu.models.config import TransformerConfig
from pangu.train.checkpoint import Checkpointer
from pangu.train.config import TrainConfig
from pangu.train.losses import LM_BATCH_AXES, BatchAxes, LossFn
from pangu.train.step import (SPIKE_SIGNALS, TrainState, batch_shardings, check_batch_keys, init_train_state,
                              make_train_step)


class ResumableBatches(Protocol):
  """What the loop needs from a data source: host batches plus a JSON-able position."""

  def __next__(self) -> dict[str, np.ndarray]: ...

  def state(self) -> dict: ...

  def restore(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """steps: total optimizer steps; checkpoints every `save_every` steps into `checkpoint_dir` (None: off)."""

  steps: int
  seed: int = 0
  checkpoint_dir: str | None = None
  save_every: int = 100
  keep_checkpoints: int = 3

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"LoopConfig.steps must be >= 1, got {self.steps!r}")
    if self.save_every < 1:
      raise ValueError(f"LoopConfig.save_every must be >= 1, got {self.save_every!r}")


def to_global_batch(batch: dict[str, np.ndarray], mesh: Mesh,
                    batch_axes: BatchAxes = LM_BATCH_AXES) -> dict[str, jax.Array]:
  """Places this process's rows of the global batch on its devices (the same call on one or many hosts)."""
  check_batch_keys(batch, batch_axes)
  shardings = batch_shardings(mesh, batch_axes)
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}


def host_metrics(metrics: dict[str, jax.Array], spike_thresholds: tuple[float, ...]) -> dict[str, Any]:
  """Device metrics -> JSON-able Python: scalars as floats, arrays as (nested) lists, spike arrays per signal."""
  m = jax.device_get(metrics)
  flags, events = m.pop("spike_flags"), m.pop("spike_events")
  out = {k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist() for k, v in m.items()}
  for i, name in enumerate(SPIKE_SIGNALS):
    for j, k in enumerate(spike_thresholds):
      out[f"{name}_spike_k{k:g}"] = bool(flags[i, j])
      out[f"{name}_spike_events_k{k:g}"] = int(events[i, j])
  return out


@contextlib.contextmanager
def _stop_requests():
  """Yields a list that SIGTERM / SIGINT append their signal number to, instead of ending the process; the
  previous handlers come back on exit. Outside the main thread (where Python cannot take signals) it only
  yields the list."""
  requests = []
  if threading.current_thread() is not threading.main_thread():
    yield requests
    return
  previous = {sig: signal.signal(sig, lambda number, _: requests.append(number))
              for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield requests
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def train(model_config: TransformerConfig, train_config: TrainConfig, loop_config: LoopConfig,
          data: ResumableBatches, mesh: Mesh, on_step: Callable[[int, dict, TrainState], None] | None = None, *,
          loss_fn: LossFn | None = None, batch_axes: BatchAxes | None = None) -> tuple[TrainState, list[dict]]:
  """Trains for `loop_config.steps` steps, resuming from the newest checkpoint if there is one.

  on_step(step, record, state): called after every step with its metrics and the new state (for probes that read
    parameters during training, e.g. norm gains).
  loss_fn, batch_axes: the objective and its batch layout, as in `make_train_step` (None: the LM loss and batch).
  Returns the final state and one metrics dict per step run in this call, with `step` and, when the loss reports
  `tokens`, `tokens_per_s`. After SIGTERM / SIGINT it returns early, the state saved: `state.step` then falls
  short of `loop_config.steps`.
  """
  batch_axes = LM_BATCH_AXES if batch_axes is None else batch_axes
  state = init_train_state(model_config, train_config, jax.random.key(loop_config.seed), mesh)
  checkpointer = None
  metadata = {"model": model_config, "train": train_config, "seed": loop_config.seed}
  if loop_config.checkpoint_dir is not None:
    checkpointer = Checkpointer(loop_config.checkpoint_dir, keep=loop_config.keep_checkpoints)
    if checkpointer.latest_step() is not None:
      state, data_state = checkpointer.restore(state, metadata=metadata)
      data.restore(data_state)
  step_fn = make_train_step(model_config, train_config, mesh, loss_fn=loss_fn, batch_axes=batch_axes)
  history = []
  saved_step = int(state.step)

  def save():
    nonlocal saved_step
    if checkpointer is not None and int(state.step) != saved_step:
      checkpointer.save(state, data_state=data.state(), metadata=metadata)
      saved_step = int(state.step)

  with _stop_requests() as stop:
    for step in range(int(state.step), loop_config.steps):
      batch = to_global_batch(next(data), mesh, batch_axes)
      start = time.perf_counter()
      state, metrics = step_fn(state, batch)
      record = host_metrics(metrics, train_config.spikes.thresholds)
      record["step"] = step
      if "tokens" in record:
        record["tokens_per_s"] = record["tokens"] / (time.perf_counter() - start)
      history.append(record)
      if (step + 1) % loop_config.save_every == 0:
        save()
      if on_step is not None:
        on_step(step, record, state)
      if stop:
        break
    save()
  if checkpointer is not None:
    checkpointer.close()
  return state, history
