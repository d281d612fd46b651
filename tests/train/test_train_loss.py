"""Injected losses in the train step: the default LM loss, a distillation loss over its own batch layout, a loss
that draws from its rng (through the loop and a checkpoint resume), and the refusal of pipeline meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import models
from pangu.models.transformer import Decoder, cross_entropy_loss
from pangu.nn import moe
from pangu.parallel import cpu_mesh, rules, single_device_mesh
from pangu.train.config import TrainConfig
from pangu.train.loop import LoopConfig, train
from pangu.train import losses
from pangu.train.losses import lm_loss
from pangu.train.step import init_train_state, make_train_step

MODEL = models.tiny()
TRAIN = TrainConfig(peak_lr=1e-2, warmup_steps=1, total_steps=30, z_loss=1e-3)
MOGE = moe.MoEConfig(num_experts=8, top_k=4, expert_dim=16, router="moge", num_groups=4, num_shared_experts=1,
                     experts_implementation="dense")
# One-hot width of the key fingerprint: distinct keys collide with probability ~1/4096.
FINGERPRINT = 4096


def _lm_batch(index: int, masked: bool = True, batch: int = 8, seq: int = 16) -> dict[str, np.ndarray]:
  """Batch `index` of random tokens (every tiny model has the same vocabulary), a quarter of them masked out."""
  rng = np.random.default_rng(index)
  toks = rng.integers(0, MODEL.vocab_size, (batch, seq + 1)).astype(np.int32)
  mask = rng.random((batch, seq)) > 0.25 if masked else np.ones((batch, seq))
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": mask.astype(np.float32)}


def _run(model, train_config, mesh, steps=3, masked=True, **step_kwargs):
  """Per-step metrics, and the initial params (on the host: the step donates the state)."""
  state = init_train_state(model, train_config, jax.random.key(0), mesh)
  initial_params = jax.device_get(state.params)
  step = make_train_step(model, train_config, mesh, **step_kwargs)
  history = []
  for i in range(steps):
    state, metrics = step(state, _lm_batch(i, masked))
    history.append(jax.device_get(metrics))
  return history, initial_params


def _reference_loss(model, train_config, params, batch) -> float:
  """The LM loss (cross entropy, z-loss, MoE losses) computed apart from the step, in float64 where it can be."""
  apply = jax.jit(lambda params, inputs: Decoder(model).apply({"params": params}, inputs,
                                                               mutable=[moe.MOE_COLLECTION]))
  logits, variables = apply(params, batch["inputs"])
  logits = np.asarray(logits, np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce = log_z - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
  mask = batch["mask"]
  loss = (ce * mask).sum() / mask.sum() + train_config.z_loss * (log_z ** 2 * mask).sum() / mask.sum()
  if model.moe is not None:
    aux = moe.moe_metrics(variables[moe.MOE_COLLECTION])
    loss += float(aux["aux_loss"]) + float(aux["router_z_loss"])
  return loss


# The MoE case checks every metric key the dense one does, plus the MoE ones; sharded dense training against one
# device is test_train_step.py's 2x2x2 case.
@pytest.mark.parametrize("name, model, plan", [
    pytest.param("dense", MODEL, dict(data=2, fsdp=2, tensor=2), marks=pytest.mark.slow),
    ("moe", models.tiny(moe=MOGE), dict(data=2, expert=4)),
])
def test_explicit_default_loss_matches_the_builtin_default(name, model, plan):
  mesh = cpu_mesh(**plan)
  builtin, initial_params = _run(model, TRAIN, mesh)
  explicit, _ = _run(model, TRAIN, mesh, loss_fn=lm_loss(model, TRAIN))
  want_keys = {"loss", "ce", "z_loss", "tokens", "grad_norm", "update_norm", "learning_rate", "per_layer_grad_norm",
               "spike_flags", "spike_events"}
  if model.moe is not None:
    want_keys |= {"moe_aux_loss", "moe_router_z_loss", "moe_imbalance_score", "moe_max_over_mean_device_load",
                  "moe_dropped", "moe_device_load"}
  for i, (got, ref) in enumerate(zip(explicit, builtin)):
    assert set(got) == set(ref) == want_keys, name
    for key in ref:
      np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, err_msg=f"{name} step {i} {key}")
    assert got["tokens"] == _lm_batch(i)["mask"].sum()
  np.testing.assert_allclose(builtin[0]["loss"], _reference_loss(model, TRAIN, initial_params, _lm_batch(0)),
                             rtol=1e-5)
  if model.moe is not None:
    # Two MoGE layers of 8 x 16 tokens x 4 experts over 4 expert devices: 128 assignments per device each.
    np.testing.assert_array_equal(builtin[0]["moe_device_load"], [256.0] * 4)


def test_gradient_accumulation_with_the_injected_loss_matches_the_full_batch():
  # Unmasked batches: every microbatch has as many tokens, so the mean of microbatch means is the full mean.
  mesh = single_device_mesh()
  full, _ = _run(MODEL, TRAIN, mesh, steps=2, masked=False)
  accum_train = TrainConfig(peak_lr=1e-2, warmup_steps=1, total_steps=30, z_loss=1e-3, grad_accum_steps=4)
  accumulated, _ = _run(MODEL, accum_train, mesh, steps=2, masked=False, loss_fn=lm_loss(MODEL, accum_train))
  for got, ref in zip(accumulated, full):
    for key in ("loss", "ce", "z_loss"):
      np.testing.assert_allclose(got[key], ref[key], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-4)
    assert got["tokens"] == ref["tokens"] == 8 * 16  # Counts add over microbatches.


def _distillation_loss(student):
  """Row-weighted KL(teacher || student) per position; the teacher's logits come in the batch."""
  model = Decoder(student)

  def loss_fn(params, batch, rng):
    del rng
    log_s = jax.nn.log_softmax(model.apply({"params": params}, batch["inputs"]))
    log_t = jax.nn.log_softmax(batch["teacher_logits"])
    per_row = (jnp.exp(log_t) * (log_t - log_s)).sum(-1).mean(-1)
    kl = (per_row * batch["advantages"]).sum() / batch["advantages"].sum()
    return kl, {"kl": kl}

  return loss_fn


def _numpy_kl(student_logits, teacher_logits, weights):
  def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
  log_s, log_t = log_softmax(student_logits), log_softmax(teacher_logits)
  per_row = (np.exp(log_t) * (log_t - log_s)).sum(-1).mean(-1)
  return (per_row * weights).sum() / weights.sum()


def test_distillation_loss_with_its_own_batch_layout_trains_the_student_only():
  teacher = models.tiny(d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, n_layers=1)
  teacher_params = Decoder(teacher).init(jax.random.key(7), jnp.zeros((1, 1), jnp.int32))["params"]
  teacher_before = jax.device_get(teacher_params)
  teacher_logits = jax.jit(lambda p, x: 20.0 * Decoder(teacher).apply({"params": p}, x))  # Temperature 1/20.
  inputs = [_lm_batch(i)["inputs"] for i in range(2)]
  batches = [{"inputs": x, "teacher_logits": np.asarray(teacher_logits(teacher_params, x)),
              "advantages": np.linspace(0.5, 1.5, 8).astype(np.float32)} for x in inputs]
  batch_axes = {"inputs": (rules.BATCH, rules.LENGTH), "teacher_logits": (rules.BATCH, rules.LENGTH, rules.ACT_VOCAB),
                "advantages": (rules.BATCH,)}
  mesh = cpu_mesh(data=2, fsdp=2, tensor=2)
  state = init_train_state(MODEL, TRAIN, jax.random.key(0), mesh)
  student_before = jax.device_get(state.params)
  step = make_train_step(MODEL, TRAIN, mesh, loss_fn=_distillation_loss(MODEL), batch_axes=batch_axes)
  with pytest.raises(ValueError, match=r"batch has keys \['inputs', 'teacher_logits'\] but batch_axes declares"):
    step(state, {k: v for k, v in batches[0].items() if k != "advantages"})
  kl = []
  for i in range(25):
    state, metrics = step(state, batches[i % 2])
    kl.append(float(metrics["kl"]))
    assert "tokens" not in metrics and metrics["loss"] == metrics["kl"]
  student_logits = Decoder(MODEL).apply({"params": student_before}, inputs[0])
  np.testing.assert_allclose(kl[0], _numpy_kl(student_logits, batches[0]["teacher_logits"],
                                              batches[0]["advantages"]), rtol=1e-4)
  assert kl[-1] < 0.5 * kl[0], kl
  assert jax.tree.structure(state.params) == jax.tree.structure(student_before)
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(student_before)))
  for a, b in zip(jax.tree.leaves(teacher_params), jax.tree.leaves(teacher_before)):
    np.testing.assert_array_equal(a, b)


def _noisy_loss(model_config):
  """LM cross entropy under dropout-like noise on the logits; reports a one-hot fingerprint of its key, no tokens."""
  model = Decoder(model_config)

  def loss_fn(params, batch, rng):
    noise_rng, probe_rng = jax.random.split(rng)
    logits = model.apply({"params": params}, batch["inputs"])
    logits = jnp.where(jax.random.bernoulli(noise_rng, 0.9, logits.shape), logits / 0.9, 0.0)
    loss, _ = cross_entropy_loss(logits, batch["targets"], batch["mask"])
    return loss, {"key_fingerprint": jax.nn.one_hot(jax.random.randint(probe_rng, (), 0, FINGERPRINT), FINGERPRINT)}

  return loss_fn


class _Batches:
  """LM batch i is a pure function of i, so the position alone resumes the stream."""

  def __init__(self):
    self.index = 0

  def __next__(self):
    self.index += 1
    return _lm_batch(self.index - 1)

  def state(self):
    return {"index": self.index}

  def restore(self, state):
    self.index = state["index"]


ACCUM_TRAIN = TrainConfig(peak_lr=1e-2, warmup_steps=1, total_steps=30, grad_accum_steps=2)


def _loop(steps, checkpoint_dir=None):
  loop_config = LoopConfig(steps=steps, checkpoint_dir=checkpoint_dir, save_every=2)
  _, history = train(MODEL, ACCUM_TRAIN, loop_config, _Batches(), single_device_mesh(), loss_fn=_noisy_loss(MODEL))
  return history


@pytest.fixture(scope="module")
def noisy_history():
  return _loop(steps=4)


def test_loss_rng_differs_per_step_and_per_microbatch(noisy_history):
  supports = []
  for record in noisy_history:
    assert "tokens" not in record and "tokens_per_s" not in record
    fingerprint = np.asarray(record["key_fingerprint"])  # host_metrics turned the array into a list.
    assert isinstance(record["key_fingerprint"], list) and fingerprint.shape == (FINGERPRINT,)
    # Two microbatches with distinct keys average two one-hots: two entries of 1/2 (one key: a single 1).
    np.testing.assert_array_equal(np.sort(fingerprint)[-3:], [0.0, 0.5, 0.5])
    supports.append(set(np.flatnonzero(fingerprint)))
  assert all(supports[i].isdisjoint(supports[j]) for i in range(4) for j in range(i))  # New keys every step.


def test_rerun_reproduces_and_resume_continues_the_rng_stream(tmp_path, noisy_history):
  first = _loop(steps=2, checkpoint_dir=str(tmp_path))  # The same seed: the same keys, noise and losses.
  resumed = _loop(steps=4, checkpoint_dir=str(tmp_path))  # From the step-2 checkpoint, its rng included.
  assert [r["step"] for r in first + resumed] == [0, 1, 2, 3]
  for got, want in zip(first + resumed, noisy_history):
    assert got == want


def test_loss_metrics_may_not_shadow_the_steps_own():
  def loss_fn(params, batch, rng):
    loss, metrics = lm_loss(MODEL, TRAIN)(params, batch, rng)
    return loss, {**metrics, "grad_norm": loss}

  mesh = single_device_mesh()
  step = make_train_step(MODEL, TRAIN, mesh, loss_fn=loss_fn)
  with pytest.raises(ValueError, match=r"the loss's metrics \['grad_norm'\] clash"):
    step(init_train_state(MODEL, TRAIN, jax.random.key(0), mesh), _lm_batch(0))


def test_pipeline_meshes_are_refused():
  mesh = cpu_mesh(pipeline=2, data=4)
  with pytest.raises(ValueError, match="make_train_step does not support pipeline parallelism: the mesh has "
                                       "pipeline=2"):
    make_train_step(MODEL, TRAIN, mesh)
  with pytest.raises(ValueError, match="init_train_state does not support pipeline parallelism: the mesh has "
                                       "pipeline=2"):
    init_train_state(MODEL, TRAIN, jax.random.key(0), mesh)


def test_loss_factory_spec():
  assert losses.load_loss_factory("pangu.train.losses:lm_loss") is lm_loss
  with pytest.raises(ValueError, match="loss factory 'pangu.train.losses' is not of the form module:factory"):
    losses.load_loss_factory("pangu.train.losses")
