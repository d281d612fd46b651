"""Few-row matmuls against [out, in] kernels (a decode step's): an AVX2 FFI kernel on CPU, XLA elsewhere."""

from pangu_kernels.skinny_matmul.api import MAX_ROWS, MIN_ROWS, cpu_kernel_supported, skinny_matmul

__all__ = ["MAX_ROWS", "MIN_ROWS", "cpu_kernel_supported", "skinny_matmul"]
