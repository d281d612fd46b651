"""Backend kernels (Pallas, XLA FFI) with plain-XLA references; they depend on JAX only, never on pangu."""

from pangu_kernels.attention import decode_attention, flash_attention

__all__ = ["decode_attention", "flash_attention"]
