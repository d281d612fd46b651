"""The DiT trains through the shared train step (pangu.train.step) with the DDPM loss injected."""

import concurrent.futures

import jax
import numpy as np
import pytest

from pangu.diffusion.objective import ddpm_loss
from pangu.diffusion.schedules import ScheduleConfig
from pangu.diffusion.train import (DIFFUSION_BATCH_AXES, DiffusionTrainConfig, dit_train_model, ema_decay_at,
                                  train_diffusion)
from pangu.models.dit import DiTConfig
from pangu.parallel.mesh import single_device_mesh
from pangu.train.step import init_train_state, make_train_step

CONFIG = DiTConfig(d_model=16, depth=2, n_heads=2)


def test_shared_step_reports_the_injected_loss_and_per_block_gradient_norms():
  train = DiffusionTrainConfig(steps=10, warmup_steps=2, learning_rate=1e-2)
  model, mesh, loss_fn = dit_train_model(CONFIG), single_device_mesh(), ddpm_loss(CONFIG, ScheduleConfig())
  state = init_train_state(model, train.train_config(), jax.random.key(0), mesh)
  # adaLN-Zero starts every block as the identity; perturb the params so every block has gradients.
  @jax.jit
  def perturb(params):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])

  params = perturb(state.params)
  state = state.replace(params=params)
  rng = np.random.default_rng(0)
  batch = {"images": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32), "labels": np.arange(8, dtype=np.int32)}
  # The step splits its rng and hands the loss the second half: recompute loss and gradients independently.
  loss_rng = jax.random.split(state.rng)[1]
  (want_loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(jax.tree.map(np.asarray, params),
                                                                              batch, loss_rng)
  want_norms = [np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                            for g in jax.tree.leaves(grads[f"block_{i}"]))) for i in range(CONFIG.depth)]
  step = make_train_step(model, train.train_config(), mesh, loss_fn=loss_fn, batch_axes=DIFFUSION_BATCH_AXES)
  new_state, metrics = step(state, batch)
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["mse"], want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["per_layer_grad_norm"], want_norms, rtol=1e-4)
  assert int(new_state.step) == 1
  with pytest.raises(ValueError, match="TrainModel needs its loss_fn"):
    make_train_step(model, train.train_config(), mesh)


def test_accumulated_step_averages_the_loss_of_each_micro_batch_on_its_own_key():
  train = DiffusionTrainConfig(steps=10, warmup_steps=2, grad_accum_steps=2)
  model, mesh, loss_fn = dit_train_model(CONFIG), single_device_mesh(), ddpm_loss(CONFIG, ScheduleConfig())
  state = init_train_state(model, train.train_config(), jax.random.key(0), mesh)
  rng = np.random.default_rng(0)
  batch = {"images": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32), "labels": np.arange(8, dtype=np.int32)}
  params = jax.tree.map(np.asarray, state.params)
  keys = jax.random.split(jax.random.split(state.rng)[1], 2)  # the loss's half of the step's rng, one per half
  halves = [jax.tree.map(lambda x, i=i: x[4 * i:4 * (i + 1)], batch) for i in range(2)]
  want = np.mean([float(loss_fn(params, half, key)[0]) for half, key in zip(halves, keys)])
  step = make_train_step(model, train.train_config(), mesh, loss_fn=loss_fn, batch_axes=DIFFUSION_BATCH_AXES)
  _, metrics = step(state, batch)
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
  with pytest.raises(ValueError, match="batch_size=6 is not divisible by grad_accum_steps=4"):
    DiffusionTrainConfig(batch_size=6, grad_accum_steps=4)


def test_ema_decay_warms_up_then_holds():
  config = DiffusionTrainConfig(ema_decay=0.99)
  assert ema_decay_at(config, 0) == pytest.approx(0.1)
  assert ema_decay_at(config, 90) == pytest.approx(0.91)
  assert ema_decay_at(config, 10_000) == 0.99


def test_models_trained_at_once_on_two_devices_match_each_trained_alone():
  """Two threads, each training on its own device, reach the bits each model reaches alone on the default device."""
  train = DiffusionTrainConfig(steps=4, batch_size=8, warmup_steps=2, learning_rate=1e-2)
  rng = np.random.default_rng(0)
  images, labels = rng.uniform(-1, 1, (32, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, 32).astype(np.int32)
  loss_fn, keys = ddpm_loss(CONFIG, ScheduleConfig()), jax.random.split(jax.random.key(0))

  def trained(key, device=None):
    return train_diffusion(train, CONFIG, loss_fn, images, labels, key, device=device)

  alone = [trained(key) for key in keys]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    together = list(pool.map(trained, keys, jax.devices()[1:3]))
  for (want_params, want_losses), (params, losses) in zip(alone, together):
    assert losses == want_losses
    jax.tree.map(np.testing.assert_array_equal, params, want_params)
  assert alone[0][1] != alone[1][1]  # the two keys train different models
