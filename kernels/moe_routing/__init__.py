"""Fused MoGE routing (Pangu Pro MoE): softmax, group-wise top-K' and the expert-sorted dispatch order."""

from pangu_kernels.moe_routing.api import moge_routing, pallas_supported
from pangu_kernels.moe_routing.reference import MoGERouting

__all__ = ["MoGERouting", "moge_routing", "pallas_supported"]
