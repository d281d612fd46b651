"""Parameter and FLOP counters, computed from shapes alone (the 135B preset is never materialised)."""

import math

import flax.linen as nn
import jax

from pangu.models.config import TransformerConfig
from pangu.models.transformer import abstract_params


def param_count(config: TransformerConfig) -> int:
  """Exact count of every parameter, gains included, from `jax.eval_shape` of the initialiser."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(abstract_params(config))))


def forward_matmul_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Matmul FLOPs of one forward pass per token at sequence length S, as the model executes them.

  Projections: 2 * (weights touched per token). Attention: QK^T and AV over the full S x S score matrix,
  2 * 2 * S * H * Dh per token (the masked half is computed too, so it counts towards utilisation).
  The embedding lookup is a gather, not a matmul.
  """
  d, dh = config.d_model, config.head_dim
  total = 0.0
  for i in range(config.n_layers):
    shape = config.layer(i)
    projections = d * dh * (2 * shape.n_heads + 2 * shape.n_kv_heads) + 3 * d * shape.d_ff
    total += 2 * projections + 4 * seq_len * shape.n_heads * dh
  total += 2 * d * config.vocab_size
  return total


def train_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Forward + backward: the backward pass costs two forward passes of matmuls."""
  return 3 * forward_matmul_flops_per_token(config, seq_len)
