"""Building and registering the CPU FFI kernels (C++ beside their Python API) once per process."""

from pangu_kernels.ffi.build import AVX512, cpu_has, register

__all__ = ["AVX512", "cpu_has", "register"]
