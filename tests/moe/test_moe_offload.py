"""Experts kept in host memory and copied in per call give the device-resident model's outputs."""

import jax
import numpy as np
import pytest

from pangu import models
from pangu.infer.offload import expert_bytes, offload_experts
from pangu.nn.moe import MoEConfig
from pangu.nn.moe.experts import ExpertWeights, selected_experts
from pangu.nn.moe.offload import offloaded_experts
from pangu.parallel import host_memory


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


def _swiglu64(x, gate, up, down):
  a, b = x @ gate, x @ up
  return (a / (1 + np.exp(-a)) * b) @ down


def test_each_loaded_expert_runs_on_exactly_its_rows():
  """Against a float64 per-row sum over the row's choices: rows sharing an expert, an expert chosen twice by
  one row (weights add), zero weights, and experts nobody chose."""
  rng = np.random.default_rng(0)
  t, d, f, e = 7, 8, 12, 6
  x = rng.normal(size=(t, d))
  kernels = [rng.normal(size=s) / 3 for s in ((e, d, f), (e, d, f), (e, f, d))]
  ids = np.array([[0, 3], [3, 0], [5, 5], [3, 1], [0, 0], [1, 3], [5, 0]])
  weights = rng.uniform(size=ids.shape)
  weights[3, 1] = 0.0
  want = np.stack([sum(w * _swiglu64(x[r], *(k[i] for k in kernels)) for i, w in zip(ids[r], weights[r]))
                   for r in range(t)])
  host = host_memory.pinned_host_sharding(jax.devices()[0], "test")
  experts = ExpertWeights(*(jax.device_put(np.float32(k), host) for k in kernels))
  got = jax.jit(offloaded_experts, static_argnums=4)(np.float32(x), np.float32(weights), ids.astype(np.int32),
                                                     experts, "float32")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _is_routed_kernel(path) -> bool:
  return [k.key for k in path[-2:]] in (["moe", "gate"], ["moe", "up"], ["moe", "down"])


def test_float16_host_copies_move_half_the_bytes_and_compute_the_rounded_model():
  cfg = models.tiny(moe=MoEConfig(num_experts=6, top_k=2, expert_dim=24, router="topk"))
  params = models.init_params(cfg, jax.random.key(0))
  host_cfg, host_params = offload_experts(cfg, params, dtype="float16")
  layer = host_params[f"layer_{cfg.n_layers - 1}"]["moe"]
  assert {layer[k].dtype for k in ("gate", "up", "down")} == {np.dtype(np.float16)}
  assert expert_bytes(cfg, "float16") == expert_bytes(cfg) // 2
  rounded = jax.tree.map_with_path(
      lambda path, v: v.astype(np.float16).astype(v.dtype) if _is_routed_kernel(path) else v, params)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
  np.testing.assert_allclose(models.forward(host_cfg, host_params, tokens), models.forward(cfg, rounded, tokens),
                             atol=1e-5, rtol=0)


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
