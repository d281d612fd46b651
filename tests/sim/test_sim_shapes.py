"""Parameter counts of the simulator's model shapes: 135B dense, 72B-A16B MoGE and 718B MLA MoE."""

import pytest

from pangu import models
from pangu.sim import shapes


def test_ultra_135b_matches_the_decoder_and_the_spec():
  shape = shapes.get_shape("ultra-135b")
  d, v, layers = 12_288, 153_376, 94
  # Spec (derived): attention 2 d^2 + 2 d 1024 and FFN 3 d 28672 per layer, untied embeddings: ~133.9B.
  per_layer = 2 * d * d + 2 * d * 1024 + 3 * d * 28_672 + 4 * d  # + four DSSN norm gains
  assert shape.param_count() == layers * per_layer + 2 * v * d + d
  assert shape.param_count() == models.param_count(models.pangu_ultra_135b())
  assert round(shape.param_count() / 1e9, 1) == 133.9


def test_pro_moe_72b_matches_the_decoder_and_table_1():
  shape = shapes.get_shape("pro-moe-72b")
  config = models.pangu_pro_moe_72b()
  assert shape.param_count() == models.param_count(config)
  assert shape.active_param_count() == models.active_param_count(config)
  # Table 1: 71.99B total, 16.50B active (our count includes router, biases and norms).
  assert shape.param_count() / 1e9 == pytest.approx(71.99, abs=0.01)
  assert shape.active_param_count() / 1e9 == pytest.approx(16.50, abs=0.01)


def test_ultra_moe_718b_by_hand():
  shape = shapes.ultra_moe_718b()
  d, v, h = 7680, 153_600, 128
  mla = (d * 1536 + 1536 * h * (128 + 64)  # query path
         + d * (512 + 64) + 512 * h * (128 + 128)  # key/value path
         + h * 128 * d + 1536 + 512)  # output projection and the two latent norms
  dense_layer = mla + 3 * d * 18_432 + 4 * d
  moe_layer = mla + 3 * d * 2048 * (256 + 1) + d * 256 + 4 * d  # routed + shared experts, router, norms
  total = 3 * dense_layer + 58 * moe_layer + 2 * v * d + d
  assert shape.param_count() == total
  assert shape.active_param_count() == total - 58 * 3 * d * 2048 * (256 - 8)
  # Spec check (derived, MTP left out): ~719.0B total, ~40.3B active against the reported 718B / 39B.
  assert round(shape.param_count() / 1e9) == 719
  assert round(shape.active_param_count() / 1e9, 1) == 40.4
  assert shape.layer_kinds().count("moe") == 58 + 1  # the MTP module trains as one more MoE layer


def test_from_config_rejects_per_layer_widths():
  config = models.tiny(layer_shapes=(models.LayerShape(4, 2, 128), models.LayerShape(4, 2, 64)))
  with pytest.raises(ValueError, match="uniform layers"):
    shapes.from_config(config)


def test_shape_validation_names_the_field():
  with pytest.raises(ValueError, match="norms_per_layer"):
    shapes.ultra_moe_718b().replace(norms_per_layer=3)
  with pytest.raises(ValueError, match="n_kv_heads"):
    shapes.GQA(n_heads=6, n_kv_heads=4, head_dim=8)
