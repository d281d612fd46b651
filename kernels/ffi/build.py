"""Compiles a kernel's C++ source on first use and registers its handlers as XLA:CPU FFI targets.

The shared library is cached under $PANGU_KERNEL_CACHE (default ~/.cache/pangu_kernels), named by a hash of
the source, the shared headers in this folder, the compiler flags and the jaxlib version whose FFI headers it
was built against, so any change rebuilds it. Where a kernel cannot run (not x86-64 with AVX2 and FMA, no C++
compiler, a failed build) `register` returns False, logs why once, and callers use their XLA reference.
"""

import ctypes
import functools
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jaxlib

FLAGS = ("-std=c++17", "-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-w")
HEADERS = os.path.dirname(os.path.abspath(__file__))

_log = logging.getLogger(__name__)


def _cpu_supports_avx2() -> bool:
  if platform.machine() not in ("x86_64", "AMD64"):
    return False
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return False
  return {"avx2", "fma"} <= set(flags)


def _library_path(source: str) -> str:
  digest = hashlib.sha256(" ".join(FLAGS).encode() + jaxlib.__version__.encode())
  for path in (source, *sorted(glob.glob(os.path.join(HEADERS, "*.h")))):
    with open(path, "rb") as f:
      digest.update(f.read())
  cache = os.environ.get("PANGU_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pangu_kernels")
  name = os.path.splitext(os.path.basename(source))[0]
  return os.path.join(cache, f"{name}-{digest.hexdigest()[:16]}.so")


def _compile(source: str, path: str) -> None:
  """Builds into a temporary file, then renames it: concurrent processes never load half a library."""
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if compiler is None:
    raise RuntimeError("no C++ compiler found (set CXX)")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".so", delete=False) as tmp:
    pass
  try:
    subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{HEADERS}", source, "-o", tmp.name],
                   check=True, capture_output=True, text=True)
    os.replace(tmp.name, path)
  except subprocess.CalledProcessError as e:
    raise RuntimeError(f"{compiler} failed: {e.stderr[-2000:]}") from e
  finally:
    if os.path.exists(tmp.name):
      os.remove(tmp.name)


@functools.cache
def register(source: str, targets: tuple[tuple[str, str], ...]) -> bool:
  """Whether the handlers of `source` are registered, as (FFI target name, exported symbol) pairs; compiles
  and loads the library once per process. False (and one log line) where the kernel cannot run here."""
  name = os.path.basename(source)
  if not _cpu_supports_avx2():
    _log.info("%s: this CPU lacks x86-64 AVX2 + FMA; using the XLA reference", name)
    return False
  path = _library_path(source)
  try:
    if not os.path.exists(path):
      _compile(source, path)
    library = ctypes.cdll.LoadLibrary(path)
    for target, symbol in targets:
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  except (OSError, RuntimeError, AttributeError) as e:
    _log.warning("%s: kernel unavailable (%s); using the XLA reference", name, e)
    return False
  return True
