"""Attention over bit-packed 1- or 2-bit KIVI keys and values (SpeCache's cache): Pallas and CPU FFI kernels,
their references and the bit layout."""

from pangu_kernels.specache.api import (IMPLEMENTATIONS, cpu_supported, lowbit_scores, lowbit_weighted_values,
                                        mixed_probabilities, mixed_scores, mixed_weighted_values, pallas_supported,
                                        resolve_implementation)
from pangu_kernels.specache.reference import dequantize_keys, dequantize_values, pack_bits, unpack_bits

__all__ = ["IMPLEMENTATIONS", "cpu_supported", "dequantize_keys", "dequantize_values", "lowbit_scores",
           "lowbit_weighted_values", "mixed_probabilities", "mixed_scores", "mixed_weighted_values", "pack_bits",
           "pallas_supported", "resolve_implementation", "unpack_bits"]
