"""Test session set-up for tests/ and kernels/: an 8-device CPU mesh and float32 matmuls, before JAX starts."""

import os

# Compiling is most of the suite's time (~60 % at level 0). XLA:CPU's backend optimisations and its MLIR fusion
# emitters cost seconds of compile per test and change no result the tests check; without the emitters the suite
# took 284 s instead of 449 s on 2 cores (same hour, same tests).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                   "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def n_devices() -> int:
  count = len(jax.devices())
  assert count == 8, f"tests expect 8 fake CPU devices, got {count}; is XLA_FLAGS overridden?"
  return count
