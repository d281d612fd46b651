"""End-to-end runs of `python -m pangu.train.main` in subprocesses: kill -9 and resume, SIGTERM and resume, and
2 hosts x 4 devices.

Every run uses the same model, data and 2x2x2 mesh, so each must reproduce the reference run's losses. Each
run is a fresh process (~12 s), so the default tier keeps the SIGTERM case; kill -9 and 2 hosts run in the full
tier (`make test-full`).
"""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

STEPS = 6
ARGS = ["--model=tiny", f"--steps={STEPS}", "--max_files=20", "--batch_size=8", "--seq_len=32",
        "--mesh=data=2,fsdp=2,tensor=2", "--warmup_steps=2", "--lr=1e-2"]
# The session's compile flags (conftest.py), without its device count: each run sets its own.
BASE_XLA = " ".join(flag for flag in os.environ["XLA_FLAGS"].split()
                    if not flag.startswith("--xla_force_host_platform_device_count"))


def _env(devices: int | None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = BASE_XLA + (f" --xla_force_host_platform_device_count={devices}" if devices else "")
  return env


def _losses(stdout: str) -> dict[int, float]:
  out = {}
  for line in stdout.splitlines():
    if line.startswith("step "):
      parts = line.split()
      out[int(parts[1])] = float(parts[3])
  return out


def _run(extra: list[str], devices: int | None = 8) -> dict[int, float]:
  proc = subprocess.run([sys.executable, "-m", "pangu.train.main", *ARGS, *extra], env=_env(devices),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return _losses(proc.stdout)


@pytest.fixture(scope="module")
def reference_losses() -> dict[int, float]:
  losses = _run([])
  assert sorted(losses) == list(range(STEPS))
  return losses


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(tmp_path, reference_losses):
  ckpt = tmp_path / "ckpt"
  args = [*ARGS, f"--checkpoint_dir={ckpt}", "--save_every=1"]
  proc = subprocess.Popen([sys.executable, "-m", "pangu.train.main", *args], env=_env(8),
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith("step 3 "):
      proc.send_signal(signal.SIGKILL)  # Mid-run, possibly mid-save: no chance to clean up.
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  first = _losses("".join(seen))
  resumed = _run([f"--checkpoint_dir={ckpt}", "--save_every=1"])
  assert min(resumed) >= 3 and max(resumed) == STEPS - 1  # Resumed, not restarted.
  for step, loss in {**first, **resumed}.items():
    assert loss == reference_losses[step], (step, loss, reference_losses[step])


def test_sigterm_saves_then_the_rerun_resumes_with_identical_losses(tmp_path, reference_losses):
  ckpt = tmp_path / "ckpt"
  args = [*ARGS, f"--checkpoint_dir={ckpt}", "--save_every=1000"]  # no periodic save before the end
  proc = subprocess.Popen([sys.executable, "-m", "pangu.train.main", *args], env=_env(8),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith("step 2 "):
      proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
  first = _losses("".join(seen))
  assert "stopped by a signal" in seen[-1] and max(first) < STEPS - 1
  saved = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  assert saved == [max(first) + 1]  # the interrupted state, saved on the way out
  resumed = _run([f"--checkpoint_dir={ckpt}", "--save_every=1000"])
  assert min(resumed) == max(first) + 1 and max(resumed) == STEPS - 1
  for step, loss in {**first, **resumed}.items():
    assert loss == reference_losses[step], (step, loss, reference_losses[step])
  assert max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == STEPS  # saved at the end too


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path, reference_losses):
  for attempt in range(2):
    port = _free_port()
    metrics = tmp_path / f"metrics{attempt}.jsonl"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "pangu.train.main", *ARGS, "--num_processes=2", f"--process_id={i}",
         f"--coordinator_address=127.0.0.1:{port}", "--local_device_count=4", f"--metrics_file={metrics}"],
        env=_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    # JAX's exit handler sometimes aborts while tearing down the coordinator's gRPC server (a request still
    # queued): after the run, outside pangu. Seen once in six runs; one retry keeps that from failing the suite.
    if not any(p.returncode and "DistributedRuntimeService::Shutdown" in err for p, (_, err) in zip(procs, outputs)):
      break
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(STEPS))  # Only process 0 writes metrics.
  for i in range(2):
    got = _losses(outputs[i][0])
    np.testing.assert_allclose([got[s] for s in range(STEPS)], [reference_losses[s] for s in range(STEPS)],
                               rtol=1e-5)
