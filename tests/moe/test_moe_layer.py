"""The MoE layer inside the decoder, its metrics, the train-step integration and the 72B-A16B preset."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import models
from pangu.nn import moe
from pangu.parallel import cpu_mesh, rules, single_device_mesh
from pangu.train.config import TrainConfig
from pangu.train.step import init_train_state, make_train_step

# The dense expert implementation compiles fastest; the grouped ones have their own tests.
MOGE = moe.MoEConfig(num_experts=8, top_k=4, expert_dim=16, router="moge", num_groups=4, num_shared_experts=1,
                     experts_implementation="dense")


def test_pro_moe_72b_parameter_counts():
  cfg = models.pangu_pro_moe_72b()
  d, v, n, f, layers = 5120, 153_376, 64, 1344, 48
  # Spec check (derived): experts + shared SwiGLU + attention per layer, untied embeddings: 71.97B / 16.48B.
  per_layer = 3 * d * f * n + 3 * d * 4 * f + 2 * d * d + 2 * d * 8 * 128
  active_per_layer = per_layer - 3 * d * f * (n - 8)
  assert round((layers * per_layer + 2 * v * d) / 1e9, 2) == 71.97
  assert round((layers * active_per_layer + 2 * v * d) / 1e9, 2) == 16.48
  # Our count adds the router (d N), the q/k/v biases and the norm gains of every layer, plus the final norm.
  extras = layers * (d * n + (40 + 2 * 8) * 128 + 2 * d) + d
  assert models.param_count(cfg) == layers * per_layer + 2 * v * d + extras
  assert models.active_param_count(cfg) == layers * active_per_layer + 2 * v * d + extras
  assert abs(models.param_count(cfg) / 71.97e9 - 1) < 0.005
  assert abs(models.active_param_count(cfg) / 16.48e9 - 1) < 0.005


def test_config_round_trip_and_layer_choice():
  cfg = models.tiny(moe=MOGE, first_k_dense=1, n_layers=3)
  assert models.TransformerConfig.from_dict(cfg.to_dict()) == cfg
  assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
  assert not cfg.scanned and models.tiny(moe=MOGE).scanned
  with pytest.raises(ValueError, match=r"first_k_dense must be an int in \[0, 2\]"):
    models.tiny(moe=MOGE, first_k_dense=3, n_layers=3)
  with pytest.raises(ValueError, match=r"first_k_dense must be an int in \[0, 0\]"):
    models.tiny(first_k_dense=1)
  with pytest.raises(ValueError, match="moe must be a MoEConfig"):
    models.tiny(moe={"num_experts": 8})


def test_decoder_with_first_k_dense_and_moge_metrics():
  cfg = models.tiny(moe=MOGE.replace(router_z_loss_coef=1e-3), first_k_dense=1)
  shapes = jax.tree.map(lambda x: x.shape, models.abstract_params(cfg))
  assert "mlp" in shapes["layer_0"] and "moe" not in shapes["layer_0"]
  assert shapes["layer_1"]["moe"]["gate"].value == (8, 64, 16)
  assert shapes["layer_1"]["moe"]["shared_gate"].value == (64, 16)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)

  @jax.jit
  def init_and_apply(key):
    params = models.Decoder(cfg).init(key, tokens)["params"]
    logits, state = models.Decoder(cfg).apply({"params": params}, tokens, mutable=[moe.MOE_COLLECTION])
    return logits, moe.moe_metrics(state[moe.MOE_COLLECTION])

  logits, metrics = init_and_apply(jax.random.key(0))
  assert logits.shape == (2, 12, cfg.vocab_size) and np.all(np.isfinite(logits))
  t = tokens.size
  assert metrics["device_load"].shape == (1, 4)  # one MoE layer, num_groups devices without expert parallelism
  np.testing.assert_array_equal(metrics["device_load"], t)  # MoGE: K' = 1 assignment per group and token
  assert float(metrics["imbalance_score"]) == 0.0 and float(metrics["max_over_mean_device_load"]) == 1.0
  assert float(metrics["expert_load"].sum()) == t * 4 and int(metrics["dropped"]) == 0
  assert 0 < float(metrics["aux_loss"]) < 0.05 and float(metrics["router_z_loss"]) > 0


def test_layer_under_expert_parallelism_matches_the_local_layer():
  config = MOGE.replace(num_experts=16, top_k=8, num_groups=8, expert_dim=8)
  layer = moe.MoEFeedForward(config, d_model=32)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, 32)), jnp.float32)
  apply = lambda p, x: layer.apply({"params": p}, x, mutable=[moe.MOE_COLLECTION])
  params, (want, want_state) = jax.jit(
      lambda key, x: ((p := layer.init(key, x)["params"]), apply(p, x)))(jax.random.key(0), x)
  with jax.set_mesh(cpu_mesh(data=2, expert=4)), nn.logical_axis_rules(rules.DEFAULT_RULES):
    got, state = jax.jit(apply)(params, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  metrics, want_metrics = (moe.moe_metrics(s[moe.MOE_COLLECTION]) for s in (state, want_state))
  # Load is reported per expert device (4) under expert parallelism, per group (8) without it.
  np.testing.assert_array_equal(metrics["device_load"], [[64.0] * 4])
  np.testing.assert_array_equal(want_metrics["device_load"], [[32.0] * 8])
  np.testing.assert_allclose(metrics["aux_loss"], want_metrics["aux_loss"], rtol=1e-6)


@pytest.mark.slow
def test_expert_parallel_training_adds_moe_losses_and_matches_one_device():
  cfg = models.tiny(moe=MOGE.replace(num_groups=8, top_k=8, num_experts=16, expert_dim=8))
  train = TrainConfig(peak_lr=1e-2, warmup_steps=1, total_steps=10)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((8, 16), np.float32)}

  def run(mesh):
    state = init_train_state(cfg, train, jax.random.key(0), mesh)
    step = make_train_step(cfg, train, mesh)
    history = []
    for _ in range(2):
      state, metrics = step(state, batch)
      history.append(jax.device_get(metrics))
    return history

  want = run(single_device_mesh())
  for got, ref in zip(run(cpu_mesh(data=2, expert=4)), want):
    np.testing.assert_allclose(got["loss"], got["ce"] + got["moe_aux_loss"] + got["moe_router_z_loss"], rtol=1e-6)
    # Two MoGE layers of 8 x 16 tokens x 8 experts over 4 expert devices: 256 assignments per device each.
    np.testing.assert_array_equal(got["moe_device_load"], [512.0] * 4)
    assert got["moe_imbalance_score"] == 0.0 and got["moe_max_over_mean_device_load"] == 1.0
    for key in ("loss", "grad_norm", "update_norm", "moe_aux_loss"):
      np.testing.assert_allclose(got[key], ref[key], rtol=1e-5)
