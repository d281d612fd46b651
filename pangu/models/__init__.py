"""Model configs, presets and the decoder; `forward(config, params, tokens)` is the family-wide entry point."""

from pangu.models.config import LayerShape, RopeScaling, TransformerConfig
from pangu.models.counting import (active_param_count, forward_matmul_flops_per_token, param_count,
                                   train_flops_per_token)
from pangu.models.presets import get_preset, pangu_pro_moe_72b, pangu_ultra_135b, pangu_ultra_moe_718b, small, tiny
from pangu.models.routing_trace import routed_expert_ids
from pangu.models.stages import LayerStages, TokenState
from pangu.models.transformer import (Decoder, abstract_params, cross_entropy_loss, forward, forward_in_stages,
                                      init_params, layer_params, stack_layers, unstack_layers)

__all__ = [
    "Decoder", "LayerShape", "LayerStages", "RopeScaling", "TokenState", "TransformerConfig", "abstract_params",
    "active_param_count", "cross_entropy_loss", "forward", "forward_in_stages", "forward_matmul_flops_per_token",
    "get_preset", "init_params", "layer_params", "pangu_pro_moe_72b", "pangu_ultra_135b", "pangu_ultra_moe_718b",
    "param_count", "routed_expert_ids", "small", "stack_layers", "tiny", "train_flops_per_token", "unstack_layers",
]
