"""Compiles a kernel's C++ source on first use and registers its handlers as XLA:CPU FFI targets.

The shared library is cached under $PANGU_KERNEL_CACHE (default ~/.cache/pangu_kernels), named by a hash of
the source, the shared headers in this folder, the compiler flags and the jaxlib version whose FFI headers it
was built against, so any change rebuilds it. Where a kernel cannot run (not x86-64 with AVX2 and FMA, no C++
compiler, a failed build) `register` returns False, logs why once, and callers use their XLA reference. A
kernel with a faster path for a wider instruction set asks for its flags (`AVX512`) where `cpu_has` them.
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
AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl")  # the mask registers, on 8- to 64-bit lanes
HEADERS = os.path.dirname(os.path.abspath(__file__))

_log = logging.getLogger(__name__)


@functools.cache
def _cpu_flags() -> frozenset[str]:
  if platform.machine() not in ("x86_64", "AMD64"):
    return frozenset()
  try:
    with open("/proc/cpuinfo") as f:
      return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
  except OSError:
    return frozenset()


def cpu_has(*features: str) -> bool:
  """Whether this x86-64 CPU has every feature, as /proc/cpuinfo names them ("avx512bw"...)."""
  return set(features) <= _cpu_flags()


def _library_path(source: str, flags: tuple[str, ...]) -> str:
  digest = hashlib.sha256(" ".join(flags).encode() + jaxlib.__version__.encode())
  for path in (source, *sorted(glob.glob(os.path.join(HEADERS, "*.h")))):
    with open(path, "rb") as f:
      digest.update(f.read())
  cache = os.environ.get("PANGU_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pangu_kernels")
  name = os.path.splitext(os.path.basename(source))[0]
  return os.path.join(cache, f"{name}-{digest.hexdigest()[:16]}.so")


def _compile(source: str, path: str, flags: tuple[str, ...]) -> None:
  """Builds into a temporary file, then renames it: concurrent processes never load half a library."""
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if compiler is None:
    raise RuntimeError("no C++ compiler found (set CXX)")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".so", delete=False) as tmp:
    pass
  try:
    subprocess.run([compiler, *flags, f"-I{jax.ffi.include_dir()}", f"-I{HEADERS}", source, "-o", tmp.name],
                   check=True, capture_output=True, text=True)
    os.replace(tmp.name, path)
  except subprocess.CalledProcessError as e:
    raise RuntimeError(f"{compiler} failed: {e.stderr[-2000:]}") from e
  finally:
    if os.path.exists(tmp.name):
      os.remove(tmp.name)


@functools.cache
def register(source: str, targets: tuple[tuple[str, str], ...], extra_flags: tuple[str, ...] = ()) -> bool:
  """Whether the handlers of `source` are registered, as (FFI target name, exported symbol) pairs; compiles
  (with `extra_flags` after FLAGS) and loads the library once per process. False (and one log line) where the
  kernel cannot run here."""
  name = os.path.basename(source)
  if not cpu_has("avx2", "fma"):
    _log.info("%s: this CPU lacks x86-64 AVX2 + FMA; using the XLA reference", name)
    return False
  flags = FLAGS + extra_flags
  path = _library_path(source, flags)
  try:
    if not os.path.exists(path):
      _compile(source, path, flags)
    library = ctypes.cdll.LoadLibrary(path)
    for target, symbol in targets:
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  except (OSError, RuntimeError, AttributeError) as e:
    _log.warning("%s: kernel unavailable (%s); using the XLA reference", name, e)
    return False
  return True
