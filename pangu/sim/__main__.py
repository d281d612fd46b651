"""Command line of the simulator.

  python -m pangu.sim search --topology=atlas-800t-a2 --chips=6144 --model=ultra-moe-718b
  python -m pangu.sim calibrate --out=pangu/sim/calibration/cpu8.json
  python -m pangu.sim measure --out=/tmp/cpu8.json --steps_out=/tmp/cpu8_steps.json --rounds=7

`search` prints the best training plans (step time, MFU, tokens/s, memory) and the rejection counts;
`calibrate` reruns the CPU microbenchmarks on 8 fake devices and writes the calibration file; `measure` runs
the calibration and the validation configs' train steps in interleaved rounds (one run of
`pangu.sim.validation.measure`) and writes both files: the independent run of the cross-run validation.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import app, flags  # noqa: E402

_TOPOLOGY = flags.DEFINE_string("topology", "atlas-800t-a2", "Topology preset (pangu.parallel.PRESETS).")
_CHIPS = flags.DEFINE_integer("chips", 6144, "Devices of the pod.")
_MODEL = flags.DEFINE_string("model", "ultra-moe-718b", "Model shape (pangu.sim.shapes.SHAPES).")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "Training sequence length.")
_BATCH = flags.DEFINE_integer("global_batch", 1536, "Sequences per optimizer step.")
_TOP = flags.DEFINE_integer("top", 10, "Plans to print.")
_OUT = flags.DEFINE_string("out", None, "Calibration file to write (default: the stored cpu8.json).")
_QUICK = flags.DEFINE_bool("quick", False, "Calibrate with fewer sizes and repeats.")
_STEPS_OUT = flags.DEFINE_string("steps_out", None, "measure: the step-times file to write.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "measure: interleaved timing rounds.", lower_bound=2)

COMMANDS = ("search", "calibrate", "measure")


def _search() -> None:
  from pangu.parallel.topology import get_topology
  from pangu.sim.plan import TrainWorkload
  from pangu.sim.search import search_training
  from pangu.sim.shapes import get_shape

  shape, topology = get_shape(_MODEL.value), get_topology(_TOPOLOGY.value, _CHIPS.value)
  result = search_training(shape, topology, TrainWorkload(_SEQ.value, _BATCH.value))
  print(f"{shape.name} on {_CHIPS.value} x {topology.device.name} ({topology.name}), "
        f"{_BATCH.value} x {_SEQ.value} tokens per step")
  print(f"{'rank':>4}  {'plan':<78} {'step s':>7} {'MFU':>6} {'Mtok/s':>7} {'bubble':>6} {'GiB':>6}")
  for rank, estimate in enumerate(result.ranked[:_TOP.value]):
    print(f"{rank + 1:>4}  {estimate.plan.describe():<78} {estimate.step_seconds:>7.2f} {estimate.mfu:>6.3f} "
          f"{estimate.tokens_per_second / 1e6:>7.3f} {estimate.bubble:>6.3f} {estimate.memory.total / 2**30:>6.1f}")
  print(f"{result.evaluated} plans in {result.seconds:.1f}s: {len(result.ranked)} feasible; rejected {result.rejected}")


def _calibrate() -> None:
  from pangu.sim import calibrate
  path = calibrate.save(calibrate.run_microbenchmarks(quick=_QUICK.value), _OUT.value or calibrate.DEFAULT_PATH)
  print(f"wrote {path}")


def _measure() -> None:
  from pangu.sim import calibrate, validation
  if not (_OUT.value and _STEPS_OUT.value):
    raise app.UsageError("measure needs --out and --steps_out")
  record, steps = validation.measure(_ROUNDS.value, quick=_QUICK.value)
  record["command"] = (f"python -m pangu.sim measure --rounds={_ROUNDS.value}{' --quick' if _QUICK.value else ''} "
                       "(interleaved with the step times)")
  calibrate.save(record, _OUT.value)
  validation.save_measurements(steps, _STEPS_OUT.value, command=record["command"])
  print(f"wrote {_OUT.value} and {_STEPS_OUT.value}")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m pangu.sim {{{'|'.join(COMMANDS)}}} [--flags]")
  {"search": _search, "calibrate": _calibrate, "measure": _measure}[argv[1]]()


if __name__ == "__main__":
  app.run(main)
