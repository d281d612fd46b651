import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pangu import models
from pangu.parallel import cpu_mesh, single_device_mesh
from pangu.train.config import TrainConfig
from pangu.train.optim import learning_rate_schedule, weight_decay_mask
from pangu.train.spikes import SpikeConfig, init_spike_state, update_spike_state
from pangu.train.step import init_train_state, make_train_step

MODEL = models.tiny(norm_placement="depth_scaled_sandwich", init="tiny")
TRAIN = TrainConfig(peak_lr=1e-2, warmup_steps=1, total_steps=10)


def _batches(n, batch=8, seq=16, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    toks = rng.integers(0, MODEL.vocab_size, (batch, seq + 1)).astype(np.int32)
    out.append({"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": np.ones((batch, seq), np.float32)})
  return out


def _run(mesh, model=MODEL, train=TRAIN, steps=3):
  state = init_train_state(model, train, jax.random.key(0), mesh)
  step = make_train_step(model, train, mesh)
  history = []
  for batch in _batches(steps):
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return state, history


@pytest.fixture(scope="module")
def single_device_run():
  return _run(single_device_mesh())


def test_sharded_2x2x2_training_matches_one_device(single_device_run):
  mesh = cpu_mesh(data=2, fsdp=2, tensor=2)
  state, history = _run(mesh)
  _, want = single_device_run
  for got, ref in zip(history, want):
    for key in ("loss", "grad_norm", "update_norm"):
      np.testing.assert_allclose(got[key], ref[key], rtol=1e-5)
    np.testing.assert_allclose(got["per_layer_grad_norm"], ref["per_layer_grad_norm"], rtol=1e-5)
  # Parameter layouts are exactly what the rules table says: embed -> fsdp, heads/mlp/vocab -> tensor.
  specs = jax.tree.map(lambda x: x.sharding.spec, state.params)
  assert specs["embedding"] == P("tensor", "fsdp")
  assert specs["lm_head"] == P("fsdp", "tensor")
  assert specs["layers"]["attn"]["q"] == P(None, "fsdp", "tensor", None)
  assert specs["layers"]["attn"]["k"] == P(None, "fsdp", "tensor", None)
  assert specs["layers"]["attn"]["o"] == P(None, "tensor", None, "fsdp")
  assert specs["layers"]["mlp"]["gate"] == P(None, "fsdp", "tensor")
  assert specs["layers"]["mlp"]["down"] == P(None, "tensor", "fsdp")
  assert specs["layers"]["post_mlp_norm"]["scale"] == P(None, None)
  # AdamW moments follow their parameters.
  mu = state.opt_state[1][0].mu
  assert mu["layers"]["mlp"]["gate"].sharding.spec == P(None, "fsdp", "tensor")


def test_gradient_accumulation_matches_the_full_batch(single_device_run):
  mesh = single_device_mesh()
  _, history = _run(mesh, train=TrainConfig(peak_lr=1e-2, warmup_steps=1, total_steps=10, grad_accum_steps=4))
  _, want = single_device_run
  for got, ref in zip(history, want):
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-4)


def test_per_layer_grad_norms_compose_the_global_norm(single_device_run):
  _, history = single_device_run
  m = history[-1]
  layers_sq = float(np.sum(np.square(m["per_layer_grad_norm"])))
  assert m["per_layer_grad_norm"].shape == (MODEL.n_layers,)
  assert layers_sq < m["grad_norm"] ** 2  # The embedding, head and final norm hold the rest.


def test_schedule_warms_up_then_decays_to_end_lr():
  cfg = TrainConfig(peak_lr=1.0, end_lr=0.1, warmup_steps=10, total_steps=110)
  lr = learning_rate_schedule(cfg)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)],
                             [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), 0.1], rtol=1e-5)


def test_weight_decay_mask_excludes_gains_only_when_asked():
  params = {"mlp": {"up": 1.0}, "norm": {"scale": 1.0}}
  assert weight_decay_mask(TrainConfig(decay_norm_gains=False), params) == {"mlp": {"up": True},
                                                                            "norm": {"scale": False}}
  assert weight_decay_mask(TrainConfig(), params)["norm"]["scale"]


def _python_spike_detector(values, decay, k, warmup):
  mean = var = 0.0
  flagged_prev, events, flags = False, 0, []
  for t, x in enumerate(values):
    flag = (not math.isfinite(x)) or (t >= warmup and x > mean + k * math.sqrt(var))
    if not flag:
      if t == 0:
        mean, var = x, 0.0
      else:
        delta = x - mean
        mean += (1 - decay) * delta
        var = decay * (var + (1 - decay) * delta * delta)
    events += flag and not flagged_prev
    flagged_prev = flag
    flags.append(flag)
  return flags, events


def test_spike_detector_matches_python_reference_and_finds_injected_spikes():
  rng = np.random.default_rng(0)
  values = 3.0 - np.linspace(0, 1, 200) + 0.01 * rng.normal(size=200)
  values[[80, 81, 150]] += 1.0
  values[170] = np.nan
  cfg = SpikeConfig(decay=0.95, thresholds=(3.0, 6.0), warmup_steps=20)
  state = init_spike_state(cfg, 1)
  update = jax.jit(lambda s, x: update_spike_state(cfg, s, x))
  flags = []
  for v in values:
    state = update(state, np.array([v], np.float32))
    flags.append(np.asarray(state.flagged[0]))
  flags = np.array(flags)
  for j, k in enumerate(cfg.thresholds):
    want_flags, want_events = _python_spike_detector(values, cfg.decay, k, cfg.warmup_steps)
    np.testing.assert_array_equal(flags[:, j], want_flags)
    assert int(state.events[0, j]) == want_events == 3  # 80-81 merge into one event, 150, 170.
