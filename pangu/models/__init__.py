"""Model configs, presets and the decoder; `forward(config, params, tokens)` is the family-wide entry point."""

from pangu.models.config import LayerShape, TransformerConfig
from pangu.models.counting import forward_matmul_flops_per_token, param_count, train_flops_per_token
from pangu.models.presets import get_preset, pangu_ultra_135b, small, tiny
from pangu.models.transformer import (Decoder, abstract_params, cross_entropy_loss, forward, init_params,
                                      layer_params, stack_layers, unstack_layers)

__all__ = [
    "Decoder", "LayerShape", "TransformerConfig", "abstract_params", "cross_entropy_loss", "forward",
    "forward_matmul_flops_per_token", "get_preset", "init_params", "layer_params", "pangu_ultra_135b",
    "param_count", "small", "stack_layers", "tiny", "train_flops_per_token", "unstack_layers",
]
