"""Experts kept in host memory and copied in per call give the device-resident model's outputs."""

import jax
import numpy as np
import pytest

from pangu import models
from pangu.infer.offload import expert_bytes, offload_experts
from pangu.nn.moe import MoEConfig
from pangu.nn.moe.experts import selected_experts


def test_selected_experts_lists_each_chosen_expert_once():
  ids = np.random.default_rng(0).integers(0, 9, (5, 2))
  order, count = selected_experts(jax.numpy.asarray(ids), 9)
  want = np.unique(ids)
  assert int(count) == len(want)
  np.testing.assert_array_equal(np.asarray(order)[:len(want)], want)
  assert sorted(np.asarray(order).tolist()) == list(range(9))


@pytest.mark.parametrize("first_k_dense", [0, 1])
def test_offloaded_experts_give_the_same_logits_and_generations(first_k_dense):
  cfg = models.tiny(moe=MoEConfig(num_experts=6, top_k=2, expert_dim=24, router="topk"), first_k_dense=first_k_dense)
  params = models.init_params(cfg, jax.random.key(0))
  host_cfg, host_params = offload_experts(cfg, params)
  moe_layer = host_params[f"layer_{cfg.n_layers - 1}"]["moe"]
  assert {moe_layer[k].sharding.memory_kind for k in ("gate", "up", "down")} == {"pinned_host"}
  assert moe_layer["router"].sharding.memory_kind == "device"
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 10)).astype(np.int32)
  np.testing.assert_allclose(models.forward(host_cfg, host_params, tokens), models.forward(cfg, params, tokens),
                             atol=1e-5, rtol=0)
  assert expert_bytes(cfg) == 3 * cfg.d_model * 24 * 4


def test_offloading_a_dense_model_is_an_error():
  with pytest.raises(ValueError, match="config.moe is None"):
    offload_experts(models.tiny(), {})


def test_decode_layout_loops_over_selected_experts_with_the_same_output():
  from pangu.infer import GenerationConfig, decode_layout, generate
  cfg = models.tiny(moe=MoEConfig(num_experts=6, top_k=2, expert_dim=24, router="topk"))
  params = models.init_params(cfg, jax.random.key(0))
  fast_cfg, fast_params = decode_layout(cfg, params)
  assert fast_cfg.moe.experts_implementation == "selected"
  gen, prompts = GenerationConfig(max_new_tokens=5), [[1, 2, 3], [4, 5]]
  for got, want in zip(generate(fast_cfg, fast_params, prompts, gen, jax.random.key(0)),
                       generate(cfg, params, prompts, gen, jax.random.key(0))):
    np.testing.assert_array_equal(got, want)
