"""The small byte-level LM the pruning experiments share (SlimLLM's `pruning`, `pangu_light`): its shape, training
until the validation loss flattens, cached under <results_dir>/pruning_base, its validation loss and a
side-by-side prefill timing. No absl flags here, so experiment modules can import it.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time

SEQ_LEN, BATCH, SEED = 128, 16, 0
PEAK_LR = 3e-3  # the base model's training recipe (also the from-scratch baseline's)
FLAT = 0.01  # validation loss has flattened when the last interval improved it by less than this fraction
# The base model's training and shape (the pruning experiment's --quick / full defaults).
BASE_FULL = dict(steps=3000, eval_every=250, width=256, layers=12, heads=8, d_ff=640)
BASE_QUICK = dict(BASE_FULL, steps=300, eval_every=100, width=128, layers=6, heads=8, d_ff=384)


def load_data(quick: bool, eval_batches: int) -> tuple:
  """(train dataset, validation batches of BATCH x SEQ_LEN) from the embedded corpus, byte tokens."""
  from pangu import data
  tokenizer = data.ByteTokenizer()
  train_data = data.LMDataset.build(tokenizer, data.CorpusConfig(max_files=200 if quick else None),
                                    split="train", seq_len=SEQ_LEN)
  val_data = data.LMDataset.build(tokenizer, data.CorpusConfig(), split="validation", seq_len=SEQ_LEN)
  return train_data, list(data.eval_batches(val_data, global_batch_size=BATCH, max_batches=eval_batches))


def calibration_rows(train_data, count: int):
  """`count` whole training sequences of SEQ_LEN tokens, drawn with SEED."""
  import numpy as np
  rng = np.random.default_rng(SEED)
  return train_data.packed.rows[rng.choice(train_data.num_rows, count, replace=False), :SEQ_LEN]


def base_config(setup: dict):
  """Unrolled layers, as every pruned model has (a non-uniform stack cannot be scanned), so prefill times compare
  the same layout; unrolled also trains ~12 % faster on CPU than scanned at this size."""
  from pangu import models
  return models.TransformerConfig(vocab_size=384, d_model=setup["width"], n_layers=setup["layers"],
                                  n_heads=setup["heads"], n_kv_heads=setup["heads"], d_ff=setup["d_ff"],
                                  init="small", max_position_embeddings=SEQ_LEN, scan_layers=False)


def validation_loss(config, params, batches: list) -> float:
  """Mean next-byte cross entropy (nats) over every unmasked validation target; perplexity is its exp."""
  from pangu import models
  total = tokens = 0.0
  for b in batches:
    ce = models.cross_entropy_loss(models.forward(config, params, b["inputs"]), b["targets"], b["mask"])[0]
    total += float(ce) * float(b["mask"].sum())
    tokens += float(b["mask"].sum())
  return total / tokens


def train_base(setup: dict, results_dir: str, train_data, val_batches: list) -> tuple:
  """(config, params, training record): trained in intervals of eval_every steps until the validation loss
  improves by less than FLAT over one, or loaded when <results_dir>/pruning_base holds this very run."""
  import jax

  from pangu import data
  from pangu.train.config import TrainConfig
  from pangu.train.loop import LoopConfig, train

  config = base_config(setup)
  steps, every = setup["steps"], setup["eval_every"]
  train_config = TrainConfig(peak_lr=PEAK_LR, end_lr=PEAK_LR / 10, warmup_steps=max(steps // 50, 10), total_steps=steps)
  folder = os.path.join(results_dir, "pruning_base")
  record_path = os.path.join(folder, "training.json")
  signature = json.loads(json.dumps({"model": config.to_dict(), "train": dataclasses.asdict(train_config),
                                     "seed": SEED, "batch": BATCH, "seq_len": SEQ_LEN}))
  mesh = data_mesh()
  batches = data.BatchIterator(train_data, global_batch_size=BATCH, seed=SEED)
  record = None
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
    if record.get("signature") != signature:
      record = None
  if record is not None:
    state, _ = train(config, train_config, LoopConfig(steps=record["final_step"], seed=SEED, checkpoint_dir=folder),
                     batches, mesh)
    return config, jax.device_get(state.params), {**record, "cached": True}
  shutil.rmtree(folder, ignore_errors=True)
  curve, start = [], time.perf_counter()
  with compilation_cache():
    for end in range(every, steps + 1, every):
      state, _ = train(config, train_config, LoopConfig(steps=end, seed=SEED, checkpoint_dir=folder,
                                                        save_every=every, keep_checkpoints=1), batches, mesh)
      params = jax.device_get(state.params)
      curve.append({"step": end, "val_loss": validation_loss(config, params, val_batches)})
      print(f"base model: step {end} val loss {curve[-1]['val_loss']:.4f}", flush=True)
      if len(curve) > 1 and curve[-2]["val_loss"] - curve[-1]["val_loss"] < FLAT * curve[-2]["val_loss"]:
        break
  last = curve[-1]["val_loss"] - curve[-2]["val_loss"] if len(curve) > 1 else float("nan")
  record = {"signature": signature, "final_step": curve[-1]["step"], "val_curve": curve,
            "flattened": len(curve) > 1 and -last < FLAT * curve[-2]["val_loss"],
            "last_interval_relative_improvement": -last / curve[-2]["val_loss"] if len(curve) > 1 else None,
            "train_seconds": time.perf_counter() - start}
  with open(record_path, "w") as f:
    json.dump(record, f, indent=2)
  return config, params, {**record, "cached": False}


@contextlib.contextmanager
def compilation_cache():
  """A persistent compilation cache in a temporary folder for the duration: each training interval is a resumed
  `train` call, which builds its step anew; the cache spares recompiling it. A cache already configured (the
  report runner's) is used as it is."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  if jax.config.jax_compilation_cache_dir:
    yield
    return
  with tempfile.TemporaryDirectory() as folder:
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
      yield
    finally:
      jax.config.update("jax_enable_compilation_cache", False)
      compilation_cache.reset_cache()


def data_mesh():
  import jax

  from pangu.parallel import cpu_mesh
  return cpu_mesh(data=len(jax.devices()))


def prefill_seconds(systems: dict, tokens, repeats: int) -> dict:
  """name -> best forward time over `repeats` rounds, every round running every system once, in turn."""
  from pangu import models
  for config, params in systems.values():  # compile outside the timed runs
    models.forward(config, params, tokens).block_until_ready()
  times = {name: [] for name in systems}
  for _ in range(repeats):
    for name, (config, params) in systems.items():
      start = time.perf_counter()
      models.forward(config, params, tokens).block_until_ready()
      times[name].append(time.perf_counter() - start)
  return {name: min(t) for name, t in times.items()}
