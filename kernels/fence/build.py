"""Registers fence.cc as an XLA:CPU FFI target (compiled on first use; pangu_kernels.ffi)."""

import os

from pangu_kernels import ffi

TARGET = "pangu_fence"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fence.cc")


def register() -> bool:
  """Whether the kernel is registered here (False: no AVX2 + FMA, no compiler, a failed build; logged once)."""
  return ffi.register(SOURCE, ((TARGET, "Fence"),))
