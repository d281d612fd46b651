"""SlimLLM-pruned copies of the Hugging Face fixtures: the recipe that make_fixtures.py's pangu step writes into
fixtures/<family>_pruned/ and that test_hf_pruned.py re-runs.

Each pruned folder is pangu's `save_pretrained` of `prune_fixture(family)`: the committed source fixture read by
`load_pretrained`, SlimLLM at RATIO in every layer (uniform=True) with its affine output recovery, calibrated on
CALIBRATION_SHAPE tokens drawn from CALIBRATION_SEED. transformers then loads that folder (make_fixtures.py's
second torch step) and its logits on the source fixture's tokens are stored beside it in reference.npz.

The recovery's intercepts become biases, as far as each family's transformers class carries them (OPTIONS):
Llama's `attention_bias` / `mlp_bias` switches hold the o_proj and down_proj biases; Qwen3's `attention_bias`
holds o_proj's but its MLP has no bias at all, so its FFN refit is scale-only (mlp_recovery_bias=False); a Qwen2
that gains an o_proj bias (q/k/v/o biases, new MLP biases, zeros for gate / up) is saved as the Llama it now
computes, since Qwen2 has q/k/v biases only.

Run as a script (the pangu step, repo venv) it writes the pruned folders:
  PYTHONPATH=. .venv/bin/python tests/interop/pruned_fixtures.py
"""

import os

if __name__ == "__main__":  # the test session's numerics (conftest.py), so that the tests reproduce the tensors
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                     "--xla_cpu_use_fusion_emitters=false")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pangu.compress.prune import prune  # noqa: E402
from pangu.interop import hf  # noqa: E402
from pangu.models import TransformerConfig  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FAMILIES = ("llama", "qwen2", "qwen3")
RATIO = 0.3
CALIBRATION_SEED, CALIBRATION_SHAPE = 0, (8, 32)
OPTIONS = {"llama": {}, "qwen2": {}, "qwen3": dict(mlp_recovery_bias=False)}
# The architecture each pruned folder must be saved as (and transformers must load it as).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def pruned_path(family: str) -> str:
  return os.path.join(FIXTURES, f"{family}_pruned")


def calibration_tokens(vocab_size: int) -> np.ndarray:
  """The fixed int32 calibration sequences, [N, S]."""
  return np.random.default_rng(CALIBRATION_SEED).integers(0, vocab_size, CALIBRATION_SHAPE).astype(np.int32)


def prune_fixture(family: str) -> tuple[TransformerConfig, dict]:
  """The source fixture of `family`, loaded and pruned by the recipe above."""
  config, params = hf.load_pretrained(os.path.join(FIXTURES, family))
  config, params, _ = prune(config, params, calibration_tokens(config.vocab_size), method="slimllm", ratio=RATIO,
                            uniform=True, batch_size=CALIBRATION_SHAPE[0], **OPTIONS[family])
  return config, params


def main() -> None:
  jax.config.update("jax_default_matmul_precision", "highest")
  for family in FAMILIES:
    config, params = prune_fixture(family)
    out = pruned_path(family)
    shutil.rmtree(out, ignore_errors=True)
    hf.save_pretrained(config, params, out)
    print(family, config.layer(0), f"{sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))} bytes")


if __name__ == "__main__":
  main()
