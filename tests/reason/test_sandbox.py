"""The code sandbox: honest candidates are scored by their tests; malicious ones are contained and score 0."""

import glob
import os
import socket
import tempfile
import threading
import time

import pytest

from pangu.reason.sandbox import WALL_CLOCK_SLACK_S, network_namespace_available, run_code

DOUBLE = "def double(x):\n  return 2 * x\n"
DOUBLE_TESTS = ["assert double(2) == 4", "assert double(-3) == -6", "assert double(0) == 0"]


def test_correct_candidate_passes_every_test():
  result = run_code(DOUBLE, DOUBLE_TESTS)
  assert (result.passed, result.total, result.reason) == (3, 3, "ok")


def test_partly_correct_candidate_scores_the_passing_tests():
  result = run_code("def double(x):\n  return x + 2\n", DOUBLE_TESTS)
  assert (result.passed, result.total) == (1, 3)  # only double(2) == 4 holds
  assert "test 1: AssertionError" in result.reason and "test 2: AssertionError" in result.reason


def test_syntax_error_scores_zero_without_running():
  result = run_code("def double(x:\n  return 2", DOUBLE_TESTS)
  assert (result.passed, result.total) == (0, 3)
  assert result.reason.startswith("syntax error")


def test_candidate_error_at_import_scores_zero():
  result = run_code("raise SystemExit(0)", DOUBLE_TESTS)
  assert result.passed == 0 and "SystemExit" in result.reason


def test_infinite_loop_hits_the_cpu_limit_in_time():
  start = time.monotonic()
  result = run_code("def double(x):\n  while True:\n    pass\n", DOUBLE_TESTS, time_limit_s=0.5)
  # On an idle machine RLIMIT_CPU fires after 1 s; on a loaded one the wall clock may come first.
  assert result.passed == 0 and ("CPU time limit" in result.reason or "wall-clock" in result.reason)
  assert time.monotonic() - start < 1 + WALL_CLOCK_SLACK_S + 3  # contained in time, with room for a loaded host


def test_sleeping_candidate_is_killed_by_the_wall_clock():
  start = time.monotonic()
  result = run_code("import time\ntime.sleep(60)", DOUBLE_TESTS, time_limit_s=0.5)
  assert result.passed == 0 and "wall-clock" in result.reason
  assert time.monotonic() - start < 1 + WALL_CLOCK_SLACK_S + 3  # contained in time, with room for a loaded host


@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n  os.fork()",
    "import os\nos.system('echo pwned > pwned.txt')",
    "import os\nos.execv('/bin/sh', ['sh', '-c', 'true'])",
    "import _posixsubprocess",
    "import ctypes",
])
def test_fork_bombs_and_new_processes_are_refused(bomb):
  result = run_code(bomb + "\n" + DOUBLE, DOUBLE_TESTS)
  assert result.passed == 0 and "PermissionError" in result.reason


def test_huge_allocation_fails_inside_the_memory_limit():
  result = run_code("blob = bytearray(8 << 30)\n" + DOUBLE, DOUBLE_TESTS, memory_mb=128)
  assert result.passed == 0 and "MemoryError" in result.reason


def test_writing_outside_the_temp_dir_is_refused_and_inside_allowed():
  target = os.path.join(tempfile.gettempdir(), f"pangu-escape-{os.getpid()}.txt")
  escape = f"def double(x):\n  open({target!r}, 'w').write('escaped')\n  return 2 * x\n"
  result = run_code(escape, DOUBLE_TESTS)
  assert result.passed == 0 and "outside its directory" in result.reason
  assert not os.path.exists(target)
  inside = "def double(x):\n  open('scratch.txt', 'w').write(str(x))\n  return 2 * int(open('scratch.txt').read())\n"
  assert run_code(inside, DOUBLE_TESTS).passed == 3


def test_the_temp_dir_is_removed_afterwards():
  pattern = os.path.join(tempfile.gettempdir(), "pangu-sandbox-*")
  before = set(glob.glob(pattern))
  run_code("open('left.txt', 'w').write('x')\n" + DOUBLE, DOUBLE_TESTS)
  assert set(glob.glob(pattern)) <= before


def test_opening_a_socket_fails_and_reaches_nobody():
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  server.settimeout(0.1)
  port = server.getsockname()[1]
  accepted = []

  def accept():
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not accepted:
      try:
        accepted.append(server.accept())
      except OSError:
        pass

  listener = threading.Thread(target=accept)
  listener.start()
  try:
    client = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n" + DOUBLE
    result = run_code(client, DOUBLE_TESTS)
  finally:
    listener.join()
    server.close()
  assert result.passed == 0
  assert "PermissionError" in result.reason or "ModuleNotFoundError" in result.reason  # refused or unreadable
  assert not accepted


def test_network_namespace_has_only_loopback_where_available():
  interfaces = ("def interfaces():\n"
                "  lines = open('/proc/self/net/dev').read().splitlines()[2:]\n"
                "  return [line.split(':')[0].strip() for line in lines]\n")
  result = run_code(interfaces, ["assert interfaces() == ['lo']"])
  assert (result.passed == 1) == network_namespace_available(), result.reason


def test_environment_secrets_do_not_reach_the_candidate(monkeypatch):
  monkeypatch.setenv("PANGU_TEST_SECRET", "hunter2")
  leak = "import os\ndef secret():\n  return os.environ.get('PANGU_TEST_SECRET')\n"
  assert run_code(leak, ["assert secret() == 'hunter2'"]).passed == 0
  parent = "import os\ndef secret():\n  return open(f'/proc/{os.getppid()}/environ').read()\n"
  result = run_code(parent, ["assert 'hunter2' in secret()"])
  assert result.passed == 0 and "PermissionError" in result.reason


def test_a_forged_report_is_not_believed():
  forge = ("import json, os\n"
           "print(json.dumps({'nonce': 'guess', 'total': 3, 'passed': 3, 'error': None, 'failures': []}))\n"
           "os.write(3, b'{\"nonce\": \"guess\", \"passed\": 3, \"error\": null, \"failures\": []}\\n')\n"
           "os._exit(0)\n")
  result = run_code(forge, DOUBLE_TESTS)
  assert result.passed == 0 and "no report" in result.reason


def test_frame_introspection_is_refused():
  snoop = "import sys\nframe = sys._getframe(1)\n" + DOUBLE
  result = run_code(snoop, DOUBLE_TESTS)
  assert result.passed == 0 and "sys._getframe" in result.reason


@pytest.mark.parametrize("kwargs, field", [
    ({"tests": []}, "tests"),
    ({"tests": "assert True"}, "tests"),
    ({"tests": ["assert ("]}, "tests[0]"),
    ({"time_limit_s": 0}, "time_limit_s"),
    ({"memory_mb": 8}, "memory_mb"),
])
def test_bad_arguments_name_the_field(kwargs, field):
  arguments = {"tests": DOUBLE_TESTS, "time_limit_s": 1.0, "memory_mb": 256} | kwargs
  with pytest.raises(ValueError, match=field.replace("[", r"\[")):
    run_code(DOUBLE, **arguments)
