"""Multi-process start-up: each process calls `initialize_from_flags()` once, before JAX touches a backend."""

from __future__ import annotations

import jax
from absl import flags


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Registers the flags `initialize_from_flags` reads."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator; unused for one process.",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", 1, "Processes in the job.", lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("process_id", 0, "This process's index in [0, num_processes).", lower_bound=0,
                       flag_values=flag_values)
  flags.DEFINE_integer("local_device_count", None, "Fake CPU devices in this process; unset keeps JAX's default.",
                       lower_bound=1, flag_values=flag_values)


def initialize(coordinator_address: str | None, num_processes: int, process_id: int) -> None:
  """Joins the job's coordinator; a no-op for a single process, so scripts call it unconditionally."""
  if num_processes == 1:
    return
  if not coordinator_address:
    raise ValueError(f"coordinator_address is required for num_processes={num_processes}")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
  # Cross-process collectives on CPU need gloo; only the CPU client reads this option.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Applies `--local_device_count`, then `initialize` with the coordinator flags."""
  if flag_values.local_device_count is not None:
    jax.config.update("jax_num_cpu_devices", flag_values.local_device_count)
  initialize(flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id)
