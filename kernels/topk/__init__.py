"""Top-k indices along the last axis: an XLA:CPU FFI kernel beside lax.top_k."""

from pangu_kernels.topk.api import IMPLEMENTATIONS, cpu_supported, kernel_registered, top_k_indices

__all__ = ["IMPLEMENTATIONS", "cpu_supported", "kernel_registered", "top_k_indices"]
