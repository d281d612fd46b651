"""kd_loss: the logit KL at a temperature, the optional cross entropy and hidden-state MSE against a NumPy
reference computed from the two models' own outputs; the teacher gets no gradient; bad requests are refused."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import models
from pangu.models.transformer import Decoder
from pangu.train.distill import kd_loss

TEACHER = models.tiny(max_position_embeddings=32)
STUDENT = models.tiny(d_model=48, head_dim=16, n_layers=1, max_position_embeddings=32)
CHANNELS = np.sort(np.random.default_rng(0).choice(64, 48, replace=False))


def _batch():
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 384, (2, 17))
  mask = (rng.random((2, 16)) > 0.3).astype(np.float32)
  return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
          "mask": jnp.asarray(mask)}


@functools.partial(jax.jit, static_argnums=0)
def _final_norm_output(config, params, tokens):
  _, state = Decoder(config).apply({"params": params}, tokens, capture_intermediates=True, mutable=["intermediates"])
  return state["intermediates"]["final_norm"]["__call__"][0]


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_kd_loss_matches_numpy_reference():
  teacher = models.init_params(TEACHER, jax.random.key(0))
  student = models.init_params(STUDENT, jax.random.key(1))
  batch = _batch()
  t, ce_weight, hidden_weight = 2.0, 0.3, 0.5
  loss_fn = jax.jit(kd_loss(STUDENT, TEACHER, teacher, temperature=t, ce_weight=ce_weight,
                            hidden_weight=hidden_weight, hidden_channels=CHANNELS))
  loss, metrics = loss_fn(student, batch, jax.random.key(0))
  s_logits = np.asarray(models.forward(STUDENT, student, batch["inputs"]), np.float64)
  t_logits = np.asarray(models.forward(TEACHER, teacher, batch["inputs"]), np.float64)
  mask = np.asarray(batch["mask"], np.float64)
  log_pt, log_ps = _log_softmax(t_logits / t), _log_softmax(s_logits / t)
  kl = np.sum(np.sum(np.exp(log_pt) * (log_pt - log_ps), axis=-1) * mask) / mask.sum()
  log_p = _log_softmax(s_logits)
  ce = -np.sum(np.take_along_axis(log_p, np.asarray(batch["targets"])[..., None], -1)[..., 0] * mask) / mask.sum()
  diff = np.asarray(_final_norm_output(STUDENT, student, batch["inputs"]), np.float64) - \
      np.asarray(_final_norm_output(TEACHER, teacher, batch["inputs"]), np.float64)[..., CHANNELS]
  mse = np.sum(np.mean(diff ** 2, axis=-1) * mask) / mask.sum()
  np.testing.assert_allclose(metrics["kd_kl"], kl, rtol=1e-4)
  np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["hidden_mse"], mse, rtol=1e-4)
  np.testing.assert_allclose(loss, t ** 2 * kl + ce_weight * ce + hidden_weight * mse, rtol=1e-4)


def test_student_equal_to_teacher_has_zero_kl_and_the_teacher_no_gradient():
  teacher = models.init_params(TEACHER, jax.random.key(0))
  loss_fn = kd_loss(TEACHER, TEACHER, teacher)
  batch = _batch()
  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(teacher, batch, jax.random.key(0))
  assert abs(float(loss)) < 1e-6
  # The student's gradient is zero at the teacher (KL minimum); the teacher itself is a closed-over constant.
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-5


def test_bad_requests_are_refused():
  teacher = models.init_params(TEACHER, jax.random.key(0))
  with pytest.raises(ValueError, match="temperature"):
    kd_loss(STUDENT, TEACHER, teacher, temperature=0.0)
  with pytest.raises(ValueError, match="hidden_channels"):
    kd_loss(STUDENT, TEACHER, teacher, hidden_weight=1.0)
  with pytest.raises(ValueError, match="vocab_size"):
    kd_loss(STUDENT.replace(vocab_size=256), TEACHER, teacher)


def test_shared_train_step_distils_the_student_towards_the_teacher():
  """The loss plugs into make_train_step unchanged: a few steps on one batch lower the KL, the teacher untouched."""
  from pangu.parallel import single_device_mesh
  from pangu.train.config import TrainConfig
  from pangu.train.step import init_train_state, make_train_step

  teacher = models.init_params(TEACHER, jax.random.key(0))
  teacher_copy = jax.tree.map(np.asarray, teacher)
  train_config = TrainConfig(peak_lr=3e-3, end_lr=3e-3, warmup_steps=1, total_steps=4, weight_decay=0.0)
  mesh = single_device_mesh()
  step = make_train_step(STUDENT, train_config, mesh, loss_fn=kd_loss(STUDENT, TEACHER, teacher))
  state = init_train_state(STUDENT, train_config, jax.random.key(1), mesh)
  kls = []
  for _ in range(4):
    state, metrics = step(state, _batch())
    kls.append(float(metrics["kd_kl"]))
  assert kls[-1] < kls[0]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, teacher), teacher_copy)
