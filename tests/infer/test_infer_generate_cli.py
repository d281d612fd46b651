"""`python -m pangu.infer.generate` end to end on a saved tiny model (byte tokenizer)."""

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
  assert "prefill: 10 tokens" in result.stdout and "decode:" in result.stdout and "tokens/s" in result.stdout
