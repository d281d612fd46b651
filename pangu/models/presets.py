"""Named model shapes: tiny (tests), small (experiments, benchmarks) and the published Pangu Ultra 135B."""

from pangu.models.config import TransformerConfig


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


PRESETS = {"tiny": tiny, "small": small, "pangu_ultra_135b": pangu_ultra_135b}


def get_preset(name: str, **overrides) -> TransformerConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name](**overrides)
