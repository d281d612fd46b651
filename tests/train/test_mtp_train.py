"""Training with the injected MTP loss, and the openPangu MoE architectures under expert parallelism: the train
step on the 8-device CPU mesh (data x expert) gives the single-device losses."""

import jax
import numpy as np
import pytest

from pangu import models
from pangu.models.transformer import Decoder
from pangu.nn import moe
from pangu.nn.mla import LatentDims
from pangu.parallel import cpu_mesh, single_device_mesh
from pangu.train.config import TrainConfig
from pangu.train.mtp import mtp_loss
from pangu.train.step import init_train_state, make_train_step

MLA = LatentDims(q_lora_rank=16, kv_lora_rank=16, qk_nope_dim=8, qk_rope_dim=4, v_head_dim=8)
# Pangu Ultra MoE in miniature: MLA, first layer dense, sigmoid top-K with a routed scale and a shared expert,
# sandwich norm, one MTP block.
ULTRA = models.tiny(n_layers=3, n_heads=4, n_kv_heads=4, mla=MLA, first_k_dense=1, norm_placement="sandwich",
                    mtp_layers=1, moe=moe.MoEConfig(num_experts=8, top_k=2, expert_dim=16, router="sigmoid_topk",
                                                    num_shared_experts=1, routed_scaling_factor=2.5,
                                                    experts_implementation="dense"))
# Pangu Pro MoE in miniature: MoGE over 4 groups, shared expert, q/k/v biases.
PRO = models.tiny(attention_bias=True, moe=moe.MoEConfig(num_experts=8, top_k=4, expert_dim=16, router="moge",
                                                         num_groups=4, num_shared_experts=1,
                                                         experts_implementation="dense"))
TRAIN = TrainConfig(peak_lr=1e-2, warmup_steps=1, total_steps=40, z_loss=0.0)


def _counting_batch(index: int, vocab: int, batch: int = 8, seq: int = 16) -> dict[str, np.ndarray]:
  """Rows that count up by a per-row stride mod V: token s+2 follows from tokens s and s+1, which is what
  an MTP block can learn and a unigram model cannot."""
  rng = np.random.default_rng(index)
  start, stride = rng.integers(0, vocab, (batch, 1)), rng.integers(1, 4, (batch, 1))
  toks = ((start + stride * np.arange(seq + 1)) % vocab).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": np.ones((batch, seq), np.float32)}


def _train(config, mesh, steps, loss_fn=None):
  state = init_train_state(config, TRAIN, jax.random.key(0), mesh)
  initial = jax.device_get(state.params)
  step = make_train_step(config, TRAIN, mesh, loss_fn=loss_fn)
  history = []
  for i in range(steps):
    state, metrics = step(state, _counting_batch(i, config.vocab_size))
    history.append(jax.device_get(metrics))
  return history, initial


def _log_softmax_ce(logits, targets):
  logits = np.asarray(logits, np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return float(np.mean(log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]))


def test_mtp_loss_trains_a_tiny_model():
  """Step 0's loss is CE(main) + 0.3 CE(MTP) computed apart from the step; after training, the MTP block
  predicts two tokens ahead far better than chance."""
  config = models.tiny(vocab_size=32, mtp_layers=1)
  history, params = _train(config, single_device_mesh(), 30, loss_fn=mtp_loss(config, TRAIN, mtp_weight=0.3))
  batch = _counting_batch(0, config.vocab_size)

  def both(module, inputs, targets):
    logits, _, state = module.run(inputs)
    return logits, module.mtp_logits(state.x, targets)

  logits, mtp = Decoder(config).apply({"params": params}, batch["inputs"], batch["targets"], method=both)
  main_ce = _log_softmax_ce(logits, batch["targets"])
  mtp_ce = _log_softmax_ce(mtp[:, :-1], batch["targets"][:, 1:])
  np.testing.assert_allclose(history[0]["loss"], main_ce + 0.3 * mtp_ce, rtol=1e-5)
  np.testing.assert_allclose(history[0]["mtp_ce"], mtp_ce, rtol=1e-5)
  assert history[-1]["mtp_ce"] < 0.5 * np.log(config.vocab_size), [h["mtp_ce"] for h in history]


@pytest.mark.slow
@pytest.mark.parametrize("name, config, loss", [("ultra_moe", ULTRA, mtp_loss), ("pro_moe", PRO, None)])
def test_moe_architectures_train_under_expert_parallelism(name, config, loss):
  """data=2 x expert=4 on the 8-device mesh: every step's loss and gradient norm are those of one device (the
  updates in between included), with the expert load counted on 4 expert devices."""
  loss_fn = None if loss is None else loss(config, TRAIN)
  sharded, _ = _train(config, cpu_mesh(data=2, expert=4), 3, loss_fn)
  single, _ = _train(config, single_device_mesh(), 3, loss_fn)
  for i, (got, ref) in enumerate(zip(sharded, single)):
    for key in ("loss", "grad_norm"):
      np.testing.assert_allclose(got[key], ref[key], rtol=2e-5, err_msg=f"{name} step {i} {key}")
  assert np.asarray(sharded[0]["moe_device_load"]).shape == (4,)
