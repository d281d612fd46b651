"""`python -m pangu.infer.generate` end to end on a saved tiny model (byte tokenizer)."""

import importlib
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from pangu import models
from pangu.interop import hf


@pytest.mark.slow  # a fresh interpreter and two compiles: ~15 s on the 2-core machine
def test_cli_prints_continuation_and_rates(tmp_path):
  config = models.tiny()  # vocab 384 covers the 259 byte-tokenizer ids
  rng = np.random.default_rng(0)
  hf.save_pretrained(config, jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                                          nn.unbox(models.abstract_params(config))), tmp_path)
  result = subprocess.run(
      [sys.executable, "-m", "pangu.infer.generate", f"--model={tmp_path}", "--prompt=hi", "--prompt=hello",
       "--max_new_tokens=3", "--temperature=0.8", "--top_k=5", "--nowarmup"],
      capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.count("-" * 40) == 2
  assert "prefill: 7 tokens" in result.stdout and "decode:" in result.stdout and "tokens/s" in result.stdout


def test_cli_reads_only_the_params_of_a_training_checkpoint(tmp_path):
  from pangu.parallel import single_device_mesh
  from pangu.train.checkpoint import Checkpointer
  from pangu.train.config import TrainConfig
  from pangu.train.step import init_train_state

  config, train = models.tiny(eos_token_ids=(7,)), TrainConfig(warmup_steps=1, total_steps=10)
  state = init_train_state(config, train, jax.random.key(1), single_device_mesh())
  Checkpointer(tmp_path).save(state, data_state={}, metadata={"model": config, "train": train})
  cli = importlib.import_module("pangu.infer.generate")  # `pangu.infer.generate` is also the function
  loaded_config, params = cli._load_training_checkpoint(str(tmp_path))
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, params, state.params)
  with pytest.raises(FileNotFoundError, match="neither"):
    cli._load_training_checkpoint(str(tmp_path / "missing"))
