"""Building and registering the CPU FFI kernels (C++ beside their Python API) once per process."""

from pangu_kernels.ffi.build import register

__all__ = ["register"]
