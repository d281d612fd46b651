"""Identities XLA does not fuse through (a value, or its cotangent): an FFI call on CPU, a barrier elsewhere."""

from pangu_kernels.fence.api import cotangent_fence, cpu_kernel_supported, fusion_fence

__all__ = ["cotangent_fence", "cpu_kernel_supported", "fusion_fence"]
