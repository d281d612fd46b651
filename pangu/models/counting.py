"""Parameter and FLOP counters, computed from shapes alone (the 135B preset is never materialised)."""

import math

import flax.linen as nn
import jax

from pangu.models.config import TransformerConfig
from pangu.models.transformer import abstract_params


def param_count(config: TransformerConfig) -> int:
  """Exact count of every parameter, gains included, from `jax.eval_shape` of the initialiser."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(abstract_params(config))))


def active_param_count(config: TransformerConfig) -> int:
  """Parameters one token uses: every parameter except the N - K routed experts it skips in each MoE layer."""
  skipped = 0
  if config.moe is not None:
    moe = config.moe
    per_layer = (moe.num_experts - moe.top_k) * 3 * config.d_model * moe.expert_dim
    skipped = per_layer * sum(config.is_moe_layer(i) for i in range(config.n_layers))
  return param_count(config) - skipped


def _ffn_weights_per_token(config: TransformerConfig, i: int) -> int:
  """FFN weights one token multiplies by in layer i: the dense MLP (3 D F for SwiGLU, 2 D F for GELU), or the
  router, K routed experts and the shared experts of a MoE layer; plus, with MoLE, the router and (training
  form) every lookup expert, since MoLE's routing is dense."""
  d = config.d_model
  if config.is_moe_layer(i):
    moe = config.moe
    return d * moe.num_experts + 3 * d * (moe.top_k * moe.expert_dim + moe.shared_dim)
  dense = (3 if config.mlp_activation == "swiglu" else 2) * d * config.layer(i).d_ff
  mole = config.mole
  if mole is None:
    return dense
  experts = 0 if mole.lookup else mole.num_experts * 2 * d * mole.expert_dim
  return dense + d * mole.num_experts + experts


def _mla_weights_per_token(config: TransformerConfig) -> int:
  """MLA's projection weights in the training form: q down/up (or one q), kv down/up and o."""
  dims, d, h = config.mla, config.d_model, config.n_heads
  q = d * h * dims.qk_dim if dims.q_lora_rank is None else dims.q_lora_rank * (d + h * dims.qk_dim)
  kv = d * dims.cache_width + dims.kv_lora_rank * h * (dims.qk_nope_dim + dims.v_head_dim)
  return q + kv + h * dims.v_head_dim * d


def layer_matmul_flops(config: TransformerConfig, i: int, n_queries: int, n_keys: int) -> float:
  """Matmul FLOPs of decoder layer i for n_queries tokens attending over n_keys keys: 2 * (weights touched) per
  token for the projections, and for the scores QK^T and AV 2 * 2 * n_keys * H * Dh per token (MLA:
  2 * n_keys * H * (qk_dim + v_head_dim)); the masked part of the score matrix is computed too. Token pruning
  (SDTP) shrinks both counts layer by layer."""
  d, dh = config.d_model, config.head_dim
  shape = config.layer(i)
  if config.mla is not None:
    attention = _mla_weights_per_token(config)
    scores = 2 * n_keys * shape.n_heads * (config.mla.qk_dim + config.mla.v_head_dim)
  else:
    attention, scores = d * dh * (2 * shape.n_heads + 2 * shape.n_kv_heads), 4 * n_keys * shape.n_heads * dh
  return n_queries * (2 * (attention + _ffn_weights_per_token(config, i)) + scores)


def forward_matmul_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Matmul FLOPs of one forward pass per token at sequence length S, as the model executes them.

  Projections: 2 * (weights touched per token). Attention: QK^T and AV over the full S x S score matrix,
  2 * 2 * S * H * Dh per token (MLA: 2 * S * H * (N + P + V)); the masked half is computed too, so it counts
  towards utilisation.
  The embedding lookup is a gather, not a matmul.
  """
  total = sum(layer_matmul_flops(config, i, 1, seq_len) for i in range(config.n_layers))
  return total + 2 * config.d_model * config.vocab_size


def train_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Forward + backward: the backward pass costs two forward passes of matmuls."""
  return 3 * forward_matmul_flops_per_token(config, seq_len)
