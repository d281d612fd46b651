"""SpeCache's scoring kernel: queries against bit-packed 1- or 2-bit KIVI keys, with its reference and bit layout."""

from pangu_kernels.specache.api import IMPLEMENTATIONS, lowbit_scores, pallas_supported, resolve_implementation
from pangu_kernels.specache.reference import dequantize_keys, pack_bits, unpack_bits

__all__ = ["IMPLEMENTATIONS", "dequantize_keys", "lowbit_scores", "pack_bits", "pallas_supported",
           "resolve_implementation", "unpack_bits"]
