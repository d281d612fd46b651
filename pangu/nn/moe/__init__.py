"""Mixture-of-experts feed-forward layers: routers (top-K, group-limited, MoGE), dispatch, experts, expert
parallelism and the Linen layer (Pangu Pro MoE, arXiv 2505.21411)."""

from pangu.nn.moe.config import MoEConfig
from pangu.nn.moe.dispatch import ExpertSort, bucket_capacity, capacity_slots, sort_by_expert
from pangu.nn.moe.experts import ExpertWeights, capacity_experts, grouped_swiglu, routed_experts
from pangu.nn.moe.layer import MOE_COLLECTION, MoEFeedForward, moe_metrics
from pangu.nn.moe.parallel import (ExpertParallelLayout, ExpertParallelOutput, balance_token_groups, current_layout,
                                   exchange_for, expert_parallel_experts, use_hierarchical_dispatch)
from pangu.nn.moe.routing import (balance_loss, balance_scores, device_load, expert_load, group_limited_route,
                                  imbalance_score, moge_route, pallas_moge_route, resolve_routing_implementation,
                                  route, router_z_loss, topk_route)

__all__ = [
    "MOE_COLLECTION", "ExpertParallelLayout", "ExpertParallelOutput", "ExpertSort", "ExpertWeights", "MoEConfig",
    "MoEFeedForward", "balance_loss", "balance_scores", "balance_token_groups", "bucket_capacity", "capacity_experts",
    "capacity_slots", "current_layout", "device_load", "exchange_for", "expert_load", "expert_parallel_experts",
    "group_limited_route", "grouped_swiglu", "imbalance_score", "moe_metrics", "moge_route", "pallas_moge_route",
    "resolve_routing_implementation", "route", "routed_experts", "router_z_loss", "sort_by_expert", "topk_route",
    "use_hierarchical_dispatch",
]
