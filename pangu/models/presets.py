"""Named model shapes: tiny (tests), small (experiments, benchmarks) and the published Pangu models."""

from pangu.models.config import TransformerConfig
from pangu.nn.mla import LatentDims
from pangu.nn.moe.config import MoEConfig


def tiny(**overrides) -> TransformerConfig:
  """Two layers, a few thousand parameters: fast enough for every unit test."""
  base = dict(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
  return TransformerConfig(**{**base, **overrides})


def small(**overrides) -> TransformerConfig:
  """A ~25M-parameter Llama-shaped model for CPU experiments and the train-step benchmark."""
  base = dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1408)
  return TransformerConfig(**{**base, **overrides})


def pangu_ultra_135b(**overrides) -> TransformerConfig:
  """The published Pangu Ultra shape (arXiv 2504.07866): 94 layers, DSSN + TinyInit, untied embeddings."""
  base = dict(vocab_size=153_376, d_model=12_288, n_layers=94, n_heads=96, n_kv_heads=8, d_ff=28_672,
              norm_placement="depth_scaled_sandwich", init="tiny", rope_theta=1e4)
  return TransformerConfig(**{**base, **overrides})


def pangu_pro_moe_72b(**overrides) -> TransformerConfig:
  """Pangu Pro MoE 72B-A16B (arXiv 2505.21411, Table 1): 48 MoGE layers, 64 experts in 8 groups, 1 per group.

  GQA 40 / 8 heads of 128, vocab 153,376, untied embeddings, plain pre-norm, q/k/v bias; experts of width 1,344
  and 4 shared experts (one SwiGLU of 5,376). Every layer is sparse; `d_ff` = K * 1344 + 5376 is the dense
  width of equal active FFN parameters (unused unless `first_k_dense` is set).
  """
  moe = MoEConfig(num_experts=64, top_k=8, expert_dim=1344, router="moge", num_groups=8, num_shared_experts=4)
  base = dict(vocab_size=153_376, d_model=5120, n_layers=48, n_heads=40, n_kv_heads=8, head_dim=128,
              d_ff=8 * 1344 + 4 * 1344, attention_bias=True, moe=moe)
  return TransformerConfig(**{**base, **overrides})


def pangu_ultra_moe_718b(**overrides) -> TransformerConfig:
  """Pangu Ultra MoE 718B (arXiv 2505.04519; the openPangu-Ultra-MoE-718B config.json), the shape of
  pangu.sim.shapes.ultra_moe_718b: 61 layers, the first 3 dense (FFN 18,432), then 256 routed experts of
  width 2,048 + 1 shared expert, top-8; MLA with 128 heads (q_lora 1536, kv_lora 512, nope 128, rope 64,
  v 128); depth-scaled sandwich norm; vocab 153,600, hidden 7,680, untied embeddings. The MTP layer is not
  part of the decoder. The router is plain softmax top-8 here, as in the simulator.
  """
  moe = MoEConfig(num_experts=256, top_k=8, expert_dim=2048, router="topk", num_shared_experts=1)
  mla = LatentDims(q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128)
  base = dict(vocab_size=153_600, d_model=7680, n_layers=61, n_heads=128, n_kv_heads=128, d_ff=18_432,
              head_dim=mla.qk_dim, mla=mla, moe=moe, first_k_dense=3, norm_placement="depth_scaled_sandwich")
  return TransformerConfig(**{**base, **overrides})


PRESETS = {"tiny": tiny, "small": small, "pangu_ultra_135b": pangu_ultra_135b,
           "pangu_pro_moe_72b": pangu_pro_moe_72b, "pangu_ultra_moe_718b": pangu_ultra_moe_718b}


def get_preset(name: str, **overrides) -> TransformerConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name](**overrides)
