"""Flash attention (forward and backward) and split-K decode attention over a KV cache, with a structural mask."""

from pangu_kernels.attention.api import IMPLEMENTATIONS, decode_attention, flash_attention, pallas_unsupported
from pangu_kernels.attention.pallas import BlockSizes

__all__ = ["IMPLEMENTATIONS", "BlockSizes", "decode_attention", "flash_attention", "pallas_unsupported"]
