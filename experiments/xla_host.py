"""The XLA flags an experiment starts JAX with on CPU, set before JAX loads; an explicit XLA_FLAGS wins.

`use_cpu_devices(n)` gives the process n host-platform devices (8 by default through `common`; the experiments
that time one device ask for 1 before importing `common`) and compiles at XLA:CPU backend optimisation level 2
instead of 3: compiling was 37 % of one quick report run, level 2 compiled an init and a train step about 30 %
faster with step times equal within noise, and balance_scope's results (its JSON's floats) agreed to 1e-6.
"""

import os

# The XLA_FLAGS this process was started with (None: unset): a runner starts each experiment with these, so
# each experiment's own choice of device count holds.
STARTING_XLA_FLAGS = os.environ.get("XLA_FLAGS")


def use_cpu_devices(count: int) -> None:
  """Sets XLA_FLAGS for `count` CPU devices unless already set (by the user or an earlier call)."""
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={count} "
                                     "--xla_backend_optimization_level=2")
