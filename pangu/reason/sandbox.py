"""A process sandbox that scores untrusted code against unit tests (the code reward of MARS, spec 3e).

`run_code(source, tests, time_limit_s=, memory_mb=)` runs the candidate and its tests in a fresh interpreter and
returns how many tests passed. The parent only `ast.parse`s the candidate (a syntax error scores 0); it never
imports or evaluates it. The layers, outermost first:

1. A separate process: `python -I -S -c <runner>` (isolated mode, no site-packages, no PYTHON* variables, the
   script's folder not on the path), started in its own session so a wall-clock timer kills the whole process
   group, with a scrubbed environment (no variable of the parent reaches it) and stdin closed.
2. No network: the child runs in a fresh network namespace (`unshare -n` as root, `unshare -rn` otherwise) where
   the kernel permits it; `network_namespace_available()` says which. Inside, only an unconfigured loopback exists.
3. Resource limits set by the runner before the candidate runs: RLIMIT_CPU (the time limit), RLIMIT_AS
   (`memory_mb`), RLIMIT_FSIZE (1 MiB), RLIMIT_NPROC, no core files. A parent running as root drops the child to
   the `nobody` user after reading the job, because root ignores RLIMIT_NPROC and may write anywhere.
   Modules outside PRELOADED_MODULES may then be unreadable to the child; those it imports before the drop.
4. A fresh temporary directory as the working directory, owned by the child, removed afterwards.
5. An audit hook (PEP 578) installed before the candidate runs: it refuses sockets, new processes (fork, exec,
   subprocess, spawn, kill), the ctypes and _posixsubprocess modules (native calls that skip those events), writes
   or deletions outside the temporary directory, reads under /proc and /sys (other processes' environments), raw
   file descriptors, and frame / gc introspection. The hook is the only network barrier where namespaces are not
   permitted; it is defence in depth, not a security boundary by itself (native code could step around it, which
   is why layers 1-4 exist).

The runner reports over a duplicate of its stdout (the candidate's own stdout and stderr go to /dev/null) one JSON
line tagged with a per-run nonce that lives only in the runner's locals, so a candidate printing a fake report is
not believed. Any limit hit, crash, timeout or missing report scores 0 passed tests, with the reason.
"""

import ast
import dataclasses
import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

# The child user when the parent is root (`nobody` on Linux).
NOBODY_UID = 65534
# Largest file the candidate may write, and most bytes of report the parent reads.
FILE_SIZE_LIMIT_BYTES = 1 << 20
REPORT_LIMIT_BYTES = 1 << 16
# Processes and threads of the child user; the audit hook already refuses fork, this backs it up.
PROCESS_LIMIT = 16
# Seconds added to the CPU limit for the wall-clock kill (interpreter start-up, a loaded machine).
WALL_CLOCK_SLACK_S = 2.0

# Stdlib modules imported before the privilege drop: a child running as `nobody` may be unable to read the
# interpreter's library folder (e.g. under /root), so these are the modules a candidate can count on.
PRELOADED_MODULES = ("bisect", "collections", "copy", "dataclasses", "decimal", "fractions", "functools", "heapq",
                     "itertools", "math", "operator", "random", "re", "statistics", "string", "typing")

_SCRUBBED_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

# Runs in the child, stdlib only. argv: workdir, cpu seconds, address-space bytes, file-size bytes, drop-to-nobody.
_RUNNER = r'''
import json, os, resource, sys

def _main():
  workdir, drop = sys.argv[1], sys.argv[5] == "1"
  cpu_s, memory_bytes, fsize_bytes = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
  with open(os.path.join(workdir, "job.json")) as f:
    job = json.load(f)
  os.remove(os.path.join(workdir, "job.json"))
  nonce, source, tests = job["nonce"], job["source"], job["tests"]
  for name in %(preloaded)r:
    __import__(name)
  report = os.fdopen(os.dup(1), "w")
  null = os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 1)
  os.dup2(null, 2)
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
  resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_bytes, fsize_bytes))
  resource.setrlimit(resource.RLIMIT_NPROC, (%(nproc)d, %(nproc)d))
  if drop:
    os.setgroups([])
    os.setgid(%(nobody)d)
    os.setuid(%(nobody)d)
  resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
  root = os.path.realpath(workdir) + os.sep

  def inside(path):
    if isinstance(path, bytes):
      path = os.fsdecode(path)
    return os.path.realpath(os.path.join(root, path)).startswith(root)

  refused_prefixes = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "ctypes.", "pty.")
  refused = {"os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.chdir", "os.fchdir", "sys._getframe",
             "sys._current_frames", "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers",
             "gc.get_referents", "object.__getattr__"}
  mutating = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod", "os.chown",
              "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}

  def hook(event, args):
    if event.startswith(refused_prefixes) or event in refused:
      raise PermissionError(f"sandbox refuses {event}")
    if event == "import" and args[0] in ("ctypes", "_ctypes", "_posixsubprocess"):
      raise PermissionError(f"sandbox refuses importing {args[0]}")  # native calls that skip the audit events
    if event == "open":
      path, mode, flags = args
      if not isinstance(path, (str, bytes)):
        raise PermissionError("sandbox refuses opening raw file descriptors")
      text = os.fsdecode(path)
      if text.startswith(("/proc", "/sys")) and not text.startswith("/proc/self/"):
        raise PermissionError(f"sandbox refuses reading {text}")
      writes = (mode is not None and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
      if writes and not inside(path):
        raise PermissionError(f"sandbox refuses writing {text} outside its directory")
    if event in mutating:
      for path in args:
        if isinstance(path, (str, bytes)) and not inside(path):
          raise PermissionError(f"sandbox refuses {event} on {os.fsdecode(path)} outside its directory")

  sys.addaudithook(hook)
  namespace = {"__name__": "__candidate__"}
  outcome = {"nonce": nonce, "total": len(tests), "passed": 0, "error": None, "failures": []}
  try:
    exec(compile(source, "candidate.py", "exec"), namespace)
  except BaseException as error:
    outcome["error"] = f"candidate raised {type(error).__name__}: {str(error)[:200]}"
  else:
    for index, test in enumerate(tests):
      try:
        exec(compile(test, f"test_{index}.py", "exec"), namespace)
        outcome["passed"] += 1
      except BaseException as error:
        outcome["failures"].append(f"test {index}: {type(error).__name__}: {str(error)[:200]}")
  report.write(json.dumps(outcome) + "\n")
  report.flush()
  os._exit(0)

_main()
''' % {"nproc": PROCESS_LIMIT, "nobody": NOBODY_UID, "preloaded": PRELOADED_MODULES}

_SIGNAL_REASONS = {signal.SIGXCPU: "CPU time limit exceeded", signal.SIGXFSZ: "file size limit exceeded",
                   signal.SIGKILL: "killed (CPU hard limit or out of memory)", signal.SIGSEGV: "crashed (SIGSEGV)"}


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """passed of total tests; reason says "ok", which tests failed, or which limit or error ended the run."""
  passed: int
  total: int
  reason: str

  @property
  def fraction(self) -> float:
    return self.passed / self.total


@functools.cache
def _unshare_prefix() -> tuple[str, ...]:
  """The command prefix that puts the child in a new network namespace, or () where the kernel refuses."""
  unshare = shutil.which("unshare")
  if unshare is None:
    return ()
  prefix = (unshare, "-n") if os.geteuid() == 0 else (unshare, "-rn")
  try:
    probe = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=10, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return ()
  return prefix if probe.returncode == 0 else ()


def network_namespace_available() -> bool:
  """Whether children run in a fresh network namespace; without one the audit hook alone refuses sockets."""
  return bool(_unshare_prefix())


def _check_args(source: str, tests: Sequence[str], time_limit_s: float, memory_mb: int) -> None:
  if not isinstance(source, str):
    raise ValueError(f"source must be a str, got {type(source).__name__}")
  if isinstance(tests, str) or not tests or not all(isinstance(test, str) for test in tests):
    raise ValueError(f"tests must be a non-empty sequence of str snippets, got {tests!r:.80}")
  for index, test in enumerate(tests):
    try:
      ast.parse(test)
    except SyntaxError as error:
      raise ValueError(f"tests[{index}] is not valid Python: {error}") from None
  if not time_limit_s > 0:
    raise ValueError(f"time_limit_s must be > 0, got {time_limit_s}")
  if not memory_mb >= 64:
    raise ValueError(f"memory_mb must be >= 64 (the interpreter needs it), got {memory_mb}")


def _read_report(process: subprocess.Popen, deadline: float) -> tuple[bytes, bool]:
  """Reads the child's report channel until EOF, REPORT_LIMIT_BYTES or the deadline; returns (bytes, timed out)."""
  data = bytearray()
  with selectors.DefaultSelector() as selector:
    selector.register(process.stdout, selectors.EVENT_READ)
    while len(data) < REPORT_LIMIT_BYTES:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        return bytes(data), True
      if not selector.select(remaining):
        continue
      chunk = os.read(process.stdout.fileno(), REPORT_LIMIT_BYTES - len(data))
      if not chunk:
        break
      data += chunk
  return bytes(data), False


def _kill_group(process: subprocess.Popen) -> None:
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  process.wait()


def _verdict(report: bytes, nonce: str, returncode: int, total: int) -> SandboxResult:
  for line in report.decode("utf-8", "replace").splitlines():
    try:
      outcome = json.loads(line)
    except ValueError:
      continue
    if isinstance(outcome, dict) and outcome.get("nonce") == nonce:
      if outcome["error"]:
        return SandboxResult(0, total, outcome["error"])
      failures = outcome["failures"]
      return SandboxResult(int(outcome["passed"]), total, "; ".join(failures) if failures else "ok")
  if returncode < 0:
    reason = _SIGNAL_REASONS.get(-returncode, f"killed by signal {-returncode}")
    return SandboxResult(0, total, reason)
  return SandboxResult(0, total, f"no report from the sandbox (exit code {returncode})")


def run_code(source: str, tests: Sequence[str], *, time_limit_s: float = 2.0, memory_mb: int = 256) -> SandboxResult:
  """Runs `source`, then each test snippet in its namespace, in a fresh sandboxed interpreter.

  A test passes when its snippet runs without raising (typically `assert f(2) == 4`). `time_limit_s` is the CPU
  limit (rounded up to whole seconds); the wall-clock kill comes WALL_CLOCK_SLACK_S after that many seconds.
  `memory_mb` caps the child's address space. Tests are trusted (a syntax error in one is a ValueError); the
  candidate is not.
  """
  _check_args(source, tests, time_limit_s, memory_mb)
  total = len(tests)
  try:
    ast.parse(source)
  except SyntaxError as error:
    return SandboxResult(0, total, f"syntax error: line {error.lineno}: {error.msg}")
  except (ValueError, RecursionError, MemoryError) as error:
    return SandboxResult(0, total, f"unparsable source: {type(error).__name__}")

  nonce = secrets.token_hex(16)
  drop = os.geteuid() == 0
  workdir = tempfile.mkdtemp(prefix="pangu-sandbox-")
  try:
    with open(os.path.join(workdir, "job.json"), "w") as f:
      json.dump({"nonce": nonce, "source": source, "tests": list(tests)}, f)
    if drop:
      os.chown(workdir, NOBODY_UID, NOBODY_UID)
    cpu_s = max(1, int(-(-time_limit_s // 1)))
    command = [*_unshare_prefix(), sys.executable, "-I", "-S", "-c", _RUNNER, workdir, str(cpu_s),
               str(memory_mb << 20), str(FILE_SIZE_LIMIT_BYTES), "1" if drop else "0"]
    process = subprocess.Popen(command, cwd=workdir, env=dict(_SCRUBBED_ENV), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                               close_fds=True)
    try:
      report, timed_out = _read_report(process, time.monotonic() + cpu_s + WALL_CLOCK_SLACK_S)
      if timed_out:
        return SandboxResult(0, total, f"wall-clock limit of {cpu_s + WALL_CLOCK_SLACK_S:.1f} s exceeded")
      try:
        returncode = process.wait(timeout=WALL_CLOCK_SLACK_S)
      except subprocess.TimeoutExpired:
        return SandboxResult(0, total, "the sandbox did not exit after reporting")
      return _verdict(report, nonce, returncode, total)
    finally:
      _kill_group(process)
      process.stdout.close()
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
