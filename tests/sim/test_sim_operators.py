"""Operator FLOPs and bytes against hand-computed values, and the roofline time of an op."""

import pytest

from pangu.nn.moe.config import MoEConfig
from pangu.parallel import topology
from pangu.sim import operators
from pangu.sim.shapes import GQA, MLA, ModelShape

# D = 512, H = 8, K = 2, Dh = 64, F = 1536, V = 1000.
DENSE = ModelShape(name="dense", vocab_size=1000, d_model=512, n_layers=2, attention=GQA(8, 2, 64), d_ff=1536)


def _by_name(ops):
  return {op.name: op for op in ops}


def test_gqa_attention_flops_and_bytes():
  ctx = operators.OpContext(tokens=1024, kv_len=1024, activation_bytes=2, weight_bytes=2, fused_attention=False)
  ops = _by_name(operators.attention_ops(DENSE, ctx))
  # q, k, v: 2 t D (H + 2K) Dh.
  assert ops["qkv_projection"].flops == 2 * 1024 * 512 * 12 * 64
  assert ops["qkv_projection"].bytes == 2 * 1024 * (512 + 12 * 64) + 2 * 512 * 12 * 64
  # Unfused core: Q K^T and P V over the full S x S scores (what our CPU decoder computes).
  assert ops["attention_scores"].flops == 2 * 1024 * 1024 * 8 * 64
  assert ops["attention_values"].flops == 2 * 1024 * 1024 * 8 * 64
  assert ops["softmax"].saved == 4 * 1024 * 1024 * 8  # float32 probabilities
  assert ops["output_projection"].flops == 2 * 1024 * 8 * 64 * 512


def test_fused_causal_core_counts_half_the_scores():
  ctx = operators.OpContext(tokens=1024, kv_len=1024)
  core = _by_name(operators.attention_ops(DENSE, ctx))["attention_core"]
  assert core.flops == 0.5 * 2 * 1024 * 1024 * 8 * (64 + 64)


def test_tensor_parallelism_splits_heads_and_replicates_scarce_kv_heads():
  ctx = operators.OpContext(tokens=1024, kv_len=1024, tp=4)
  qkv = _by_name(operators.attention_ops(DENSE, ctx))["qkv_projection"]
  # 8 / 4 = 2 query heads per device; 2 kv heads < tp = 4, so each device keeps both.
  assert qkv.flops == 2 * 1024 * 512 * (2 + 2 * 2) * 64


def test_mla_projection_flops():
  mla = MLA(n_heads=16, q_lora_rank=96, kv_lora_rank=64, qk_nope_dim=32, qk_rope_dim=16, v_head_dim=32)
  shape = DENSE.replace(attention=mla)
  ctx = operators.OpContext(tokens=100, kv_len=100, tp=2)
  ops = _by_name(operators.attention_ops(shape, ctx))
  assert ops["q_down"].flops == 2 * 100 * 512 * 96  # replicated over tp
  assert ops["q_up"].flops == 2 * 100 * 96 * 8 * (32 + 16)  # 16 / 2 heads
  assert ops["kv_down"].flops == 2 * 100 * 512 * (64 + 16)
  assert ops["kv_up"].flops == 2 * 100 * 64 * 8 * (32 + 32)
  assert ops["attention_core"].flops == 0.5 * 2 * 100 * 100 * 8 * (48 + 32)
  assert ops["output_projection"].flops == 2 * 100 * 8 * 32 * 512


def test_moe_layer_flops():
  moe = MoEConfig(num_experts=16, top_k=4, expert_dim=256, router="topk", num_shared_experts=1)
  shape = DENSE.replace(moe=moe)
  ctx = operators.OpContext(tokens=2048, kv_len=2048, tp=2, ep=4)
  ops = _by_name(operators.moe_ops(shape, ctx))
  assert ops["router"].flops == 2 * 2048 * 512 * 16
  # t K rows on an average device, three projections of width F / tp.
  assert ops["routed_experts"].flops == 6 * 2048 * 4 * 512 * 128
  assert ops["shared_expert_gate_up"].flops == 2 * 2048 * 512 * 2 * 128
  # With 8192 tokens in the EP group every local expert is used: 4 experts' weights are read.
  assert ops["routed_experts"].weights == pytest.approx(2 * 3 * 512 * 128 * 4)


def test_blocked_experts_pad_rows_and_launch_per_block():
  moe = MoEConfig(num_experts=8, top_k=2, expert_dim=64, router="topk")
  ctx = operators.OpContext(tokens=512, kv_len=64, ep=2, expert_block_rows=128)
  experts = _by_name(operators.moe_ops(DENSE.replace(moe=moe), ctx))["routed_experts"]
  # 1024 rows over 4 local experts: 256 per expert, block 128, half a block of padding per expert.
  rows = 1024 + 4 * 64
  assert experts.flops == 6 * rows * 512 * 64
  assert experts.launches == 3 * 10


def test_op_time_is_the_roofline_plus_static_cost():
  device = topology.atlas_800t_a2().device
  big = operators.Op("matmul", "matmul", flops=1e12, bytes=1e6)
  expected = 1e12 / (353.9e12 * 0.7) + 5e-6
  assert operators.op_seconds(big, device, "bfloat16") == pytest.approx(expected)
  assert operators.op_seconds(big, device, "bfloat16", backward=True) == pytest.approx(2 * expected)
  measured = operators.FamilyCost(forward_scale=1.5, backward_factor=3.0)
  assert operators.op_seconds(big, device, "bfloat16", measured) == pytest.approx(1.5 * expected)
  assert operators.op_seconds(big, device, "bfloat16", measured, backward=True) == pytest.approx(
      1.5 * (3 * 1e12 / (353.9e12 * 0.7) + 2 * 5e-6))
  # Passes over the saved activations add to the backward pass only, at the memory roofline.
  activations = operators.Op("matmul", "matmul", flops=1e12, bytes=1e6, saved=3e9)
  passes = operators.FamilyCost(forward_scale=1.5, backward_factor=3.0, saved_passes=2.0)
  assert operators.op_seconds(activations, device, "bfloat16", passes) == pytest.approx(1.5 * expected)
  assert operators.op_seconds(activations, device, "bfloat16", passes, backward=True) == pytest.approx(
      1.5 * (3 * 1e12 / (353.9e12 * 0.7) + 2 * 5e-6) + 2 * 3e9 / (1.6 * 1024**4 * 0.6))
  streaming = operators.Op("copy", "vector", flops=1e6, bytes=1e9)
  assert operators.op_seconds(streaming, device, "bfloat16") == pytest.approx(1e9 / (1.6 * 1024**4 * 0.6) + 2e-6)


def test_head_counts_vocab_projection_per_tp_rank():
  ctx = operators.OpContext(tokens=10, kv_len=10, tp=2)
  head = _by_name(operators.head_ops(DENSE, ctx))
  assert head["lm_head"].flops == 2 * 10 * 512 * 500
  assert head["cross_entropy"].saved == 4 * 10 * 500


def test_family_cost_rejects_negative_saved_passes():
  with pytest.raises(ValueError, match="FamilyCost.saved_passes"):
    operators.FamilyCost(saved_passes=-1.0)
