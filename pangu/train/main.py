"""Train a decoder LM from the command line, on one or many processes.

  python -m pangu.train.main --model=tiny --steps=200 --mesh=data=2,fsdp=2,tensor=2 \
      --checkpoint_dir=/tmp/run --metrics_file=/tmp/run/metrics.jsonl

Rerunning the same command resumes from the newest checkpoint in --checkpoint_dir. Multi-host: add
--num_processes, --process_id and --coordinator_address (and --local_device_count for fake CPU devices).
--loss=module:factory swaps the objective for any `LossFn` that reads the LM batch (inputs, targets, mask).
"""

import json
import sys

from absl import app, flags, logging

from pangu.parallel import distributed

_MODEL = flags.DEFINE_string("model", "tiny", "Model preset (pangu.models.presets).")
_NORM = flags.DEFINE_enum("norm_placement", None, ["pre", "sandwich", "depth_scaled_sandwich"],
                          "Override the preset's norm placement.")
_INIT = flags.DEFINE_enum("init", None, ["tiny", "small", "normal"], "Override the preset's init scheme.")
_STEPS = flags.DEFINE_integer("steps", 100, "Optimizer steps.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Global batch size (sequences).", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", 128, "Sequence length.", lower_bound=1)
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 10, "Linear warmup steps.", lower_bound=0)
_ACCUM = flags.DEFINE_integer("grad_accum_steps", 1, "Micro-batches per step.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Init and data-order seed.", lower_bound=0)
_DATA = flags.DEFINE_string("data", "stdlib", "'stdlib' or comma-separated .txt/.jsonl files.")
_MAX_FILES = flags.DEFINE_integer("max_files", None, "Use only the first N corpus files.", lower_bound=1)
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "'byte' or a tokenizer.json path.")
_MESH = flags.DEFINE_string("mesh", None, "Parallel plan, e.g. 'data=2,fsdp=2,tensor=2'; the sizes' product "
                            "must equal the device count. Unset: data parallel over every device.")
_CKPT = flags.DEFINE_string("checkpoint_dir", None, "Checkpoint folder; resumes from it when non-empty.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 50, "Steps between checkpoints.", lower_bound=1)
_METRICS = flags.DEFINE_string("metrics_file", None, "Append one JSON line of metrics per step here.")
_LOSS = flags.DEFINE_string("loss", None, "Loss factory 'module:name', called as name(model_config, train_config) "
                            "-> LossFn; unset: pangu.train.losses.lm_loss.")
distributed.define_flags()


def parse_plan(spec: str) -> dict[str, int]:
  """'data=2,tensor=4' -> {'data': 2, 'tensor': 4}; a malformed entry is an error naming it."""
  plan = {}
  for item in filter(None, spec.split(",")):
    name, sep, value = item.partition("=")
    if not sep or not value.strip().isdigit():
      raise ValueError(f"--mesh entry {item!r} is not of the form axis=size")
    plan[name.strip()] = int(value)
  return plan


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # library INFO logs (Orbax writes dozens per save) only on request
    logging.set_verbosity(logging.WARNING)
  from pangu.train.checkpoint import CheckpointError
  try:
    run()
  except (ValueError, FileNotFoundError, CheckpointError) as e:  # bad flags, data or checkpoints: one line
    sys.exit(f"error: {e}")


def run():
  distributed.initialize_from_flags()
  import jax  # After distributed start-up, which must precede any backend use.

  from pangu import data, models
  from pangu.parallel import cpu_mesh
  from pangu.train.config import TrainConfig
  from pangu.train import losses
  from pangu.train.loop import LoopConfig, train

  tokenizer = data.load_tokenizer(_TOKENIZER.value)
  overrides = {k: v for k, v in (("norm_placement", _NORM.value), ("init", _INIT.value)) if v is not None}
  model_config = models.get_preset(_MODEL.value, **overrides)
  if model_config.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"model vocab_size={model_config.vocab_size} < tokenizer vocab_size={tokenizer.vocab_size}")
  source = "stdlib" if _DATA.value == "stdlib" else tuple(_DATA.value.split(","))
  dataset = data.LMDataset.build(tokenizer, data.CorpusConfig(source=source, max_files=_MAX_FILES.value),
                                 split="train", seq_len=_SEQ.value)
  batches = data.BatchIterator(dataset, global_batch_size=_BATCH.value, seed=_SEED.value,
                               process_index=jax.process_index(), process_count=jax.process_count())
  train_config = TrainConfig(peak_lr=_LR.value, end_lr=_LR.value / 10, warmup_steps=_WARMUP.value,
                             total_steps=max(_STEPS.value, _WARMUP.value + 1), grad_accum_steps=_ACCUM.value)
  loop_config = LoopConfig(steps=_STEPS.value, seed=_SEED.value, checkpoint_dir=_CKPT.value,
                           save_every=_SAVE_EVERY.value)
  mesh = cpu_mesh(**(parse_plan(_MESH.value) if _MESH.value else {"data": len(jax.devices())}))
  loss_fn = None if _LOSS.value is None else losses.load_loss_factory(_LOSS.value)(model_config, train_config)

  def log(step, record, _state):
    throughput = f" tokens/s {record['tokens_per_s']:.0f}" if "tokens_per_s" in record else ""
    print(f"step {step} loss {record['loss']:.6f} grad_norm {record['grad_norm']:.4f}{throughput}", flush=True)
    if _METRICS.value and jax.process_index() == 0:
      with open(_METRICS.value, "a") as f:
        f.write(json.dumps(record) + "\n")

  state, _ = train(model_config, train_config, loop_config, batches, mesh, on_step=log, loss_fn=loss_fn)
  if int(state.step) < loop_config.steps:
    kept = f"checkpoint saved in {_CKPT.value}; rerun to resume" if _CKPT.value else "no --checkpoint_dir: not saved"
    print(f"stopped by a signal after step {int(state.step) - 1}: {kept}", flush=True)


if __name__ == "__main__":
  app.run(main)
