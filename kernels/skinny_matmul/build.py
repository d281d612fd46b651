"""Compiles skinny_matmul.cc on first use and registers it as an XLA:CPU FFI target.

The shared library is cached under $PANGU_KERNEL_CACHE (default ~/.cache/pangu_kernels), named by a hash of
the source, the compiler flags and the jaxlib version whose FFI headers it was built against, so an upgrade
rebuilds it. Where the kernel cannot run (not x86-64 with AVX2 and FMA, no C++ compiler, a failed build)
`register` returns False, logs why once, and callers use XLA's own matmul.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jaxlib

TARGET = "pangu_skinny_matmul"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "skinny_matmul.cc")
FLAGS = ("-std=c++17", "-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-w")

_log = logging.getLogger(__name__)


def _cpu_supports_kernel() -> bool:
  if platform.machine() not in ("x86_64", "AMD64"):
    return False
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return False
  return {"avx2", "fma"} <= set(flags)


def _library_path() -> str:
  with open(SOURCE, "rb") as f:
    digest = hashlib.sha256(f.read() + " ".join(FLAGS).encode() + jaxlib.__version__.encode()).hexdigest()[:16]
  cache = os.environ.get("PANGU_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pangu_kernels")
  return os.path.join(cache, f"skinny_matmul-{digest}.so")


def _compile(path: str) -> None:
  """Builds into a temporary file, then renames it: concurrent processes never load half a library."""
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if compiler is None:
    raise RuntimeError("no C++ compiler found (set CXX)")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".so", delete=False) as tmp:
    pass
  try:
    subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp.name], check=True,
                   capture_output=True, text=True)
    os.replace(tmp.name, path)
  except subprocess.CalledProcessError as e:
    raise RuntimeError(f"{compiler} failed: {e.stderr[-2000:]}") from e
  finally:
    if os.path.exists(tmp.name):
      os.remove(tmp.name)


@functools.cache
def register() -> bool:
  """Whether the kernel is registered (compiling and loading it once per process)."""
  if not _cpu_supports_kernel():
    _log.info("skinny_matmul: this CPU lacks x86-64 AVX2 + FMA; using XLA's matmul")
    return False
  path = _library_path()
  try:
    if not os.path.exists(path):
      _compile(path)
    library = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.SkinnyMatmul), platform="cpu")
  except (OSError, RuntimeError) as e:
    _log.warning("skinny_matmul: kernel unavailable (%s); using XLA's matmul", e)
    return False
  return True
