"""The small byte LM that really retrieves, shared by SDTP (`sdtp`) and SpeCache (`specache`); issues 11, 15, 16.
No absl flags here, so experiment modules can import it.

Task: pangu.data.retrieval (one-token needles carrying a key and a value, buried in corpus text; the query is the
key token, the answer the value token). Recipe, all through the library's train step
(`pangu.train.step.make_train_step`):
  1. circuit: a 2-layer GQA model (RoPE, head size `head_dim`) learns associative recall on dense rows of needles
     and queries, DENSE_LEN tokens (`circuit_dense` steps: a head that matches the query key against the needles and
     copies the value), then on a mix of dense rows and text rows with needles at lengths `train_lens`
     (`circuit_mixed` steps), so attention by content carries to the evaluation lengths.
  2. grow: `pangu.models.growth.grow_depth` inserts identity layers (zero output projections: the function is
     unchanged), so the model has `layers` layers with the two trained layers at `circuit_at`. Retrieval then
     happens at those depths; SDTP's pruning (from layer 2) runs before it, so what a method prunes decides the
     answer.
  3. tune: `grown_steps` steps of the whole grown model on the mix (0 keeps the grown model as it is).
The trained model is cached under <results_dir>/retrieval_lm/<digest of everything above>: the first experiment
that needs a recipe trains it, the next loads it.

What we tried (2-layer D=64 models, loaded 2-core machine): bytes "@ab:47;" records (earlier attempt): chance per
digit after 1000 steps; separate one-token key and value (induction needs two composed heads): dense recall 10 %
(1/16 of a row's values) after 550 steps at lr 1e-2 or 3e-3; one needle token carrying key and value: dense recall
98 % after 125 steps, then 91 % on 512-token text prompts after 50 mixed steps. Longer contexts need longer
training rows: QUICK's LM answers 94 % of 512-token prompts but 50 / 25 / 0 % at 1k / 2k / 4k tokens; with
train_lens (512, 2048, 8192) and 300 mixed steps (28 min) 88 / 81 / 12 % at 2k / 4k / 8k (16 prompts each); with
head_dim 128, train_lens (512, 2048, 4096) and 400 mixed steps (13 min) 75 % at 4k (16 prompts; 83 % of 48 others).
"""

import dataclasses
import hashlib
import json
import os
import tempfile
import time

from experiments import common
from pangu.data import retrieval

SEED = 0
DENSE_LEN, BATCH, NEEDLES, ANSWER_WEIGHT, DENSE_SHARE = 64, 32, 4, 4.0, 0.5
FULL = dict(width=128, heads=4, kv_heads=2, head_dim=32, d_ff=256, layers=12, circuit_at=(5, 11), circuit_dense=400,
            circuit_mixed=1200, grown_steps=200, train_lens=(512, 1024, 2048), peak_lr=3e-3)
QUICK = dict(width=64, heads=2, kv_heads=1, head_dim=32, d_ff=128, layers=12, circuit_at=(5, 11), circuit_dense=150,
             circuit_mixed=150, grown_steps=0, train_lens=(256, 512), peak_lr=3e-3)


def vocab() -> retrieval.RetrievalVocab:
  return retrieval.RetrievalVocab()


def haystack(split: str) -> retrieval.Haystack:
  """Corpus text of a split (the first 200 files, as the experiments always used)."""
  from pangu import data
  return retrieval.Haystack(data.load_documents(data.CorpusConfig(max_files=200), split))


def model_config(setup: dict, n_layers: int):
  from pangu import models
  return models.TransformerConfig(vocab_size=vocab().vocab_size, d_model=setup["width"], n_layers=n_layers,
                                  n_heads=setup["heads"], n_kv_heads=setup["kv_heads"], head_dim=setup["head_dim"],
                                  d_ff=setup["d_ff"], init="small", max_position_embeddings=8192)


def _train(config, params, steps: int, lengths: tuple, dense_share: float, peak_lr: float, rng, train_text,
           label: str, log: list) -> dict:
  """`steps` train steps from `params` (None: a fresh init), cycling the row lengths; returns the params."""
  import jax

  from pangu.parallel import single_device_mesh
  from pangu.train.config import TrainConfig
  from pangu.train.step import init_train_state, make_train_step
  train_config = TrainConfig(peak_lr=peak_lr, end_lr=peak_lr / 10, warmup_steps=min(20, steps - 1),
                             total_steps=steps, weight_decay=0.01)
  mesh = single_device_mesh()  # the report configures 8 host devices; one step on one is faster here
  state = init_train_state(config, train_config, jax.random.key(SEED), mesh)
  if params is not None:
    state = state.replace(params=jax.device_put(params, jax.tree.map(lambda a: a.sharding, state.params)))
  step = make_train_step(config, train_config, mesh)
  start = time.perf_counter()
  for i in range(steps):
    length = lengths[i % len(lengths)]
    batch = BATCH if length <= DENSE_LEN else max(2, BATCH * DENSE_LEN * 2 // length)
    state, metrics = step(state, retrieval.training_batch(rng, vocab(), train_text, batch=batch, length=length,
                                                          dense_share=dense_share, needles=NEEDLES,
                                                          answer_weight=ANSWER_WEIGHT))
    if (i + 1) % max(1, steps // 5) == 0:
      log.append({"phase": label, "step": i + 1, "loss": float(metrics["loss"]),
                  "seconds": time.perf_counter() - start})
      print(f"retrieval LM {label}: step {i + 1} loss {log[-1]['loss']:.3f} ({log[-1]['seconds']:.0f} s)",
            flush=True)
  return jax.device_get(state.params)


def train_or_load(setup: dict, results_dir: str) -> tuple:
  """(config, params, record): the grown, tuned LM, loaded from <results_dir>/retrieval_lm when it holds this very
  recipe, else trained (and saved there). record: loss log, seconds per phase, `cached`."""
  import flax.serialization
  import jax
  import numpy as np

  from pangu import models
  from pangu.models.growth import grow_depth
  config = model_config(setup, setup["layers"])
  signature = json.loads(json.dumps({"setup": setup, "model": config.to_dict(), "seed": SEED,
                                     "data": [DENSE_LEN, BATCH, NEEDLES, ANSWER_WEIGHT, DENSE_SHARE,
                                              dataclasses.asdict(vocab())]}))
  # One folder per recipe, so experiments asking for different recipes do not retrain each other's LM.
  digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:12]
  folder = os.path.join(results_dir, "retrieval_lm", digest)
  try:
    with open(os.path.join(folder, "record.json")) as f:
      record = json.load(f)
    if record["signature"] == signature:
      template = jax.device_get(models.init_params(config, jax.random.key(SEED)))
      with open(os.path.join(folder, "params.msgpack"), "rb") as f:
        return config, flax.serialization.from_bytes(template, f.read()), {**record, "cached": True}
  except (OSError, ValueError, KeyError):
    pass
  rng, text, log, seconds = np.random.default_rng(SEED), haystack("train"), [], {}
  small = model_config(setup, len(setup["circuit_at"]))
  start = time.perf_counter()
  params = _train(small, None, setup["circuit_dense"], (DENSE_LEN,), 1.0, setup["peak_lr"], rng, text, "dense", log)
  seconds["dense"] = time.perf_counter() - start
  params = _train(small, params, setup["circuit_mixed"], tuple(setup["train_lens"]), DENSE_SHARE, setup["peak_lr"],
                  rng, text, "mixed", log)
  seconds["mixed"] = time.perf_counter() - start - seconds["dense"]
  config, params = grow_depth(small, params, setup["layers"], tuple(setup["circuit_at"]), jax.random.key(SEED + 1))
  if setup["grown_steps"]:
    params = _train(config, params, setup["grown_steps"], tuple(setup["train_lens"]), DENSE_SHARE,
                    setup["peak_lr"] / 3, rng, text, "grown", log)
  seconds["total"] = time.perf_counter() - start
  record = {"signature": signature, "log": log, "train_seconds": seconds}
  # Params first, then the record that vouches for them, each written whole (temp file + rename): an interrupted
  # save leaves no record matching half-written params.
  os.makedirs(folder, exist_ok=True)
  with tempfile.NamedTemporaryFile("wb", dir=folder, delete=False, suffix=".tmp") as f:
    f.write(flax.serialization.to_bytes(params))
  os.replace(f.name, os.path.join(folder, "params.msgpack"))
  common.write_json("record", record, folder)
  return config, params, {**record, "cached": False}
