"""GRPO against a float64 NumPy reference: advantages, the clipped objective under each aggregation, k3 KL,
REINFORCE at rho = 1, zero-variance filtering with refill, packing, and the loss inside the shared train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import models
from pangu.infer.decoding import GenerationConfig
from pangu.models.transformer import Decoder
from pangu.parallel import cpu_mesh, single_device_mesh
from pangu.reason.grpo import (GRPO_BATCH_AXES, GRPOConfig, balanced_order, fill_groups, group_advantages,
                               grpo_batch, grpo_loss, grpo_objective, k3_kl, pack_rollouts, sample_groups,
                               sequence_logprobs_fn, token_logprobs, truncated_importance_weights)
from pangu.train.config import TrainConfig
from pangu.train.step import init_train_state, make_train_step


def reference_advantages(rewards, done_right=False, eps=1e-4):
  rewards = np.asarray(rewards, np.float64)
  out = np.empty_like(rewards)
  for g, row in enumerate(rewards):
    centred = row - row.mean()
    out[g] = centred if done_right else centred / (np.sqrt(((row - row.mean()) ** 2).sum() / (len(row) - 1)) + eps)
  return out


def reference_loss(logp, batch, beta, epsilon, aggregation="token", done_right=False):
  """The GRPO loss token by token in float64 loops."""
  logp = np.asarray(logp, np.float64)
  rows, length = logp.shape
  per_token = np.zeros_like(logp)
  for b in range(rows):
    a = float(batch["advantages"][b])
    for t in range(length):
      rho = np.exp(logp[b, t] - batch["old_logp"][b, t])
      surrogate = min(rho * a, min(max(rho, 1 - epsilon), 1 + epsilon) * a)
      d = batch["ref_logp"][b, t] - logp[b, t]
      per_token[b, t] = -surrogate * batch["is_weight"][b, t] + beta * (np.exp(d) - d - 1)
  mask = np.asarray(batch["mask"], np.float64)
  if done_right:
    return (per_token * mask).sum() / mask.size
  if aggregation == "token":
    return (per_token * mask).sum() / mask.sum()
  return np.mean([(per_token[b] * mask[b]).sum() / mask[b].sum() for b in range(rows)])


def random_batch(seed, rows=6, length=7):
  rng = np.random.default_rng(seed)
  logp = np.log(rng.uniform(0.05, 0.9, (rows, length)))
  batch = {
      "old_logp": logp + rng.normal(0, 0.3, (rows, length)),
      "ref_logp": logp + rng.normal(0, 0.2, (rows, length)),
      "is_weight": rng.uniform(0.5, 2.0, (rows, length)),
      "advantages": rng.normal(0, 1, rows),
      "mask": (rng.random((rows, length)) > 0.3).astype(np.float64),
  }
  batch["mask"][:, 0] = 1.0
  return logp, batch


def to_jax(batch):
  return {key: jnp.asarray(value, jnp.float32) for key, value in batch.items()}


@pytest.mark.parametrize("done_right", [False, True])
def test_group_advantages_match_numpy(done_right):
  rewards = np.random.default_rng(0).integers(0, 2, (5, 8)).astype(np.float64)
  rewards[0] = 1.0  # a zero-variance group: advantages 0, not NaN
  got = np.asarray(group_advantages(jnp.asarray(rewards), done_right=done_right))
  np.testing.assert_allclose(got, reference_advantages(rewards, done_right), rtol=1e-5, atol=1e-6)
  assert np.all(got[0] == 0)


@pytest.mark.parametrize("aggregation, done_right", [("token", False), ("sequence_mean", False), ("token", True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_objective_matches_numpy(aggregation, done_right, seed):
  logp, batch = random_batch(seed)
  config = GRPOConfig(beta=0.04, epsilon=0.2, aggregation=aggregation, done_right=done_right)
  loss, metrics = grpo_objective(jnp.asarray(logp, jnp.float32), to_jax(batch), config)
  expected = reference_loss(logp, batch, 0.04, 0.2, aggregation, done_right)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
  assert float(metrics["tokens"]) == batch["mask"].sum()


def test_token_and_sequence_mean_aggregation_differ_on_a_hand_built_batch():
  # Row 0: one completion token with advantage +1; row 1: three tokens with advantage -1; rho = 1, no KL.
  batch = {"old_logp": np.zeros((2, 3)), "ref_logp": np.zeros((2, 3)), "is_weight": np.ones((2, 3)),
           "advantages": np.array([1.0, -1.0]), "mask": np.array([[1, 0, 0], [1, 1, 1]], np.float64)}
  logp = jnp.zeros((2, 3))
  token, _ = grpo_objective(logp, to_jax(batch), GRPOConfig(aggregation="token"))
  sequence, _ = grpo_objective(logp, to_jax(batch), GRPOConfig(aggregation="sequence_mean"))
  # token level: (-1 + 3) / 4 = 0.5; sequence mean: (-1 + 1) / 2 = 0.
  np.testing.assert_allclose([float(token), float(sequence)], [0.5, 0.0], atol=1e-7)


def test_kl_is_zero_at_the_reference_and_positive_elsewhere():
  logp = jnp.log(jnp.array([[0.1, 0.5, 0.9]]))
  np.testing.assert_allclose(np.asarray(k3_kl(logp, logp)), 0.0, atol=1e-7)
  d = np.array([0.3, -0.2, 1.0])
  np.testing.assert_allclose(np.asarray(k3_kl(jnp.zeros(3), jnp.asarray(d))), np.exp(d) - d - 1, rtol=1e-6)
  _, batch = random_batch(3)
  batch["ref_logp"] = batch["old_logp"]
  _, metrics = grpo_objective(jnp.asarray(batch["old_logp"], jnp.float32), to_jax(batch), GRPOConfig())
  assert abs(float(metrics["kl"])) < 1e-7


def test_gradient_at_rho_one_is_reinforce_with_normalised_advantages():
  _, batch = random_batch(4)
  batch["is_weight"] = np.ones_like(batch["is_weight"])
  config = GRPOConfig(beta=0.0)
  grad = jax.grad(lambda lp: grpo_objective(lp, to_jax(batch), config)[0])(jnp.asarray(batch["old_logp"],
                                                                                          jnp.float32))
  expected = -batch["advantages"][:, None] * batch["mask"] / batch["mask"].sum()
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)


def test_clipping_stops_the_gradient_outside_the_trust_region():
  batch = {"old_logp": np.zeros((1, 2)), "ref_logp": np.zeros((1, 2)), "is_weight": np.ones((1, 2)),
           "advantages": np.array([1.0]), "mask": np.ones((1, 2))}
  logp = jnp.log(jnp.array([[1.5, 1.1]]))  # rho = 1.5 is clipped for A > 0, 1.1 is not
  grad = jax.grad(lambda lp: grpo_objective(lp, to_jax(batch), GRPOConfig(beta=0.0))[0])(logp)
  np.testing.assert_allclose(np.asarray(grad), [[0.0, -1.1 / 2]], rtol=1e-5)


def test_truncated_importance_weights_cap_and_stop_gradient():
  prox, behaviour = jnp.log(jnp.array([0.5, 0.9, 0.2])), jnp.log(jnp.array([0.5, 0.3, 0.4]))
  np.testing.assert_allclose(np.asarray(truncated_importance_weights(prox, behaviour, 2.0)), [1.0, 2.0, 0.5],
                             rtol=1e-6)
  grad = jax.grad(lambda p: truncated_importance_weights(p, behaviour, 2.0).sum())(prox)
  assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_numpy(temperature):
  rng = np.random.default_rng(5)
  logits, targets = rng.normal(size=(2, 3, 11)), rng.integers(0, 11, (2, 3))
  tempered = logits / temperature
  log_softmax = tempered - np.log(np.exp(tempered).sum(-1, keepdims=True))
  expected = np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
  got = token_logprobs(jnp.asarray(logits), jnp.asarray(targets), temperature)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def _sampler(reward_rows):
  """sample(i) -> the i-th generation batch of groups, each with an id and the given rewards."""
  def sample(i):
    rewards = np.asarray(reward_rows[i], np.float64)
    return {"rewards": rewards, "group_id": np.arange(len(rewards)) + 100 * i}
  return sample


def test_zero_variance_groups_are_dropped_and_refilled():
  batches = [[[1, 1], [0, 1], [0, 0]], [[1, 0], [1, 1], [0, 1]]]
  groups, stats = fill_groups(_sampler(batches), 3, GRPOConfig())
  assert list(groups["group_id"]) == [1, 100, 102]
  assert (stats.gen_batches, stats.generated, stats.dropped, stats.topped_up, stats.surplus) == (2, 6, 3, 0, 0)
  assert stats.drop_fraction == 0.5
  _, stats = fill_groups(_sampler([[[1, 0], [0, 1], [1, 0]]]), 2, GRPOConfig())
  assert stats.surplus == 1


def test_refill_stops_at_max_gen_batches_and_tops_up():
  batches = [[[1, 1], [0, 1]], [[0, 0], [1, 1]]]
  groups, stats = fill_groups(_sampler(batches), 3, GRPOConfig(max_gen_batches=2))
  assert list(groups["group_id"]) == [1, 0, 100] and stats.topped_up == 2
  unfiltered, _ = fill_groups(_sampler(batches), 2, GRPOConfig(filter_zero_variance=False))
  assert list(unfiltered["group_id"]) == [0, 1]
  with pytest.raises(ValueError, match="rewards of shape"):
    fill_groups(_sampler([[[1, 0, 1]]]), 1, GRPOConfig())


def test_pack_rollouts_masks_completion_targets():
  packed = pack_rollouts([[5, 6], [7]], [[8, 9, 1], [2]], seq_len=5)
  np.testing.assert_array_equal(packed["inputs"], [[5, 6, 8, 9, 1], [7, 2, 0, 0, 0]])
  np.testing.assert_array_equal(packed["targets"], [[6, 8, 9, 1, 0], [2, 0, 0, 0, 0]])
  np.testing.assert_array_equal(packed["mask"], [[0, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
  with pytest.raises(ValueError, match="over seq_len"):
    pack_rollouts([[1, 2, 3]], [[4, 5, 6, 7]], seq_len=5)


def test_grpo_batch_assembles_advantages_and_off_policy_weights():
  packed = pack_rollouts([[1]] * 4, [[2, 3]] * 4, seq_len=3)
  rewards = np.array([[1.0, 0.0], [0.0, 0.0]])
  rng = np.random.default_rng(7)
  behaviour, ref, prox = (np.log(rng.uniform(0.1, 0.9, (4, 3))) for _ in range(3))
  config = GRPOConfig(num_generations=2)
  on_policy = grpo_batch(packed, rewards, behaviour, ref, config)
  np.testing.assert_allclose(on_policy["advantages"], reference_advantages(rewards).reshape(-1), rtol=1e-5)
  np.testing.assert_array_equal(on_policy["is_weight"], 1.0)
  np.testing.assert_allclose(on_policy["old_logp"], behaviour, rtol=1e-6)
  decoupled = grpo_batch(packed, rewards, behaviour, ref, config, prox_logp=prox)
  np.testing.assert_allclose(decoupled["is_weight"], np.minimum(np.exp(prox - behaviour), 2.0), rtol=1e-5)
  np.testing.assert_allclose(decoupled["old_logp"], prox, rtol=1e-6)
  same = grpo_batch(packed, rewards, behaviour, ref, config, prox_logp=behaviour)
  assert all(np.allclose(same[key], on_policy[key]) for key in on_policy)  # on-policy: both options agree
  assert set(on_policy) == set(GRPO_BATCH_AXES)
  with pytest.raises(ValueError, match="rewards of shape"):
    grpo_batch(packed, rewards.reshape(1, 4), behaviour, ref, config)


def _answer_probs(model, params, prompt, answers) -> np.ndarray:
  """float64 softmax of the decoder's next-token logits after `prompt`, at the `answers` tokens."""
  logits = np.asarray(Decoder(model).apply({"params": params}, jnp.asarray([prompt]))[0, -1], np.float64)
  probs = np.exp(logits - logits.max())
  return (probs / probs.sum())[answers]


def test_a_grpo_step_raises_the_expected_reward_of_a_toy_policy():
  """One prompt, a group of four one-token answers, only the first rewarded: a train step with `grpo_loss` raises
  that answer's probability and lowers the others', so the policy's expected reward over the group's answers,
  p(rewarded) / sum p(answers), rises (float64 softmax of the model's logits before and after)."""
  model = models.tiny(d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)
  config = GRPOConfig(num_generations=4, beta=0.04)
  train = TrainConfig(peak_lr=1e-3, end_lr=1e-3, warmup_steps=0, total_steps=2, weight_decay=0.0)
  mesh = single_device_mesh()
  state = init_train_state(model, train, jax.random.key(0), mesh)
  params = jax.device_get(state.params)
  prompt, answers = [1, 2, 3], [10, 11, 12, 13]
  packed = pack_rollouts([prompt] * 4, [[a] for a in answers], seq_len=4)
  old = np.asarray(sequence_logprobs_fn(model)(params, packed["inputs"], packed["targets"]))
  batch = grpo_batch(packed, np.array([[1.0, 0.0, 0.0, 0.0]]), old, old, config)
  step = make_train_step(model, train, mesh, loss_fn=grpo_loss(model, config), batch_axes=GRPO_BATCH_AXES)
  new_state, _ = step(state, batch)
  before = _answer_probs(model, params, prompt, answers)
  after = _answer_probs(model, jax.device_get(new_state.params), prompt, answers)
  assert after[0] > before[0] and np.all(after[1:] < before[1:])
  assert after[0] / after.sum() > before[0] / before.sum()


@pytest.mark.parametrize("kwargs, field", [({"num_generations": 1}, "num_generations"), ({"epsilon": 1.5}, "epsilon"),
                                           ({"aggregation": "sum"}, "aggregation"), ({"beta": -1}, "beta"),
                                           ({"temperature": 0.0}, "temperature")])
def test_config_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    GRPOConfig(**kwargs)


@pytest.mark.slow  # compiles generation and a sharded train step
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_grpo_loss_in_the_shared_train_step_on_sampled_groups(temperature):
  """Groups sampled by the decode engine, packed, and trained on by the jitted step sharded over 8 devices; the
  loss's policy is softmax(logits / temperature), as the behaviour log-probs."""
  model = models.tiny()
  config = GRPOConfig(num_generations=4, beta=0.04, temperature=temperature)
  train = TrainConfig(peak_lr=1e-3, warmup_steps=1, total_steps=4)
  mesh = cpu_mesh(data=4, fsdp=2)
  state = init_train_state(model, train, jax.random.key(0), mesh)
  params = jax.device_get(state.params)
  prompts = [[1, 2, 3], [4, 5]]
  groups = sample_groups(model, params, prompts, GenerationConfig(max_new_tokens=6), jax.random.key(1),
                         config.num_generations)
  rewards = np.array([[float(len(c) % 2) for c in group] for group in groups])
  packed = pack_rollouts([p for p in prompts for _ in range(4)], [c for g in groups for c in g], seq_len=10)
  logprobs = sequence_logprobs_fn(model, temperature)
  old = np.asarray(logprobs(params, packed["inputs"], packed["targets"]))
  batch = grpo_batch(packed, rewards, old, old, config)
  logits = np.asarray(Decoder(model).apply({"params": params}, packed["inputs"]), np.float64) / temperature
  log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  logp = np.take_along_axis(log_softmax, packed["targets"][..., None], -1)[..., 0]
  expected = reference_loss(logp, {k: np.asarray(v, np.float64) for k, v in batch.items()}, 0.04, 0.2)
  step = make_train_step(model, train, mesh, loss_fn=grpo_loss(model, config), batch_axes=GRPO_BATCH_AXES)
  _, metrics = step(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4, atol=1e-5)
  assert float(metrics["tokens"]) == packed["mask"].sum()


def test_balanced_order_takes_labels_round_robin():
  np.testing.assert_array_equal(balanced_order(["a", "a", "a", "b", "c", "b"], 5), [0, 3, 4, 1, 5])
  np.testing.assert_array_equal(balanced_order([1, 1, 1, 2], 4), [0, 3, 1, 2])


def test_stratified_fill_keeps_drawing_until_every_label_has_its_share():
  """Label 0's groups are informative at once, label 1's only in the third batch: unstratified filling stops
  after the first batch with label 0 only; stratified filling draws on and takes half of each."""
  informative, flat = [0, 1], [1, 1]
  batches = [[informative, informative, flat, flat], [informative, informative, flat, flat],
             [informative, informative, informative, informative]]

  def sample(i):
    rewards = np.asarray(batches[i], np.float32)
    return {"rewards": rewards, "family": np.asarray([0, 0, 1, 1]), "group_id": 100 * i + np.arange(4)}

  plain, stats = fill_groups(sample, 2, GRPOConfig())
  assert list(plain["family"]) == [0, 0] and stats.gen_batches == 1
  stratified, stats = fill_groups(sample, 4, GRPOConfig(), strata="family")
  assert sorted(stratified["family"]) == [0, 0, 1, 1] and stats.gen_batches == 3
  assert list(stratified["group_id"]) == [0, 202, 1, 203]
  with pytest.raises(ValueError, match="'family'"):
    fill_groups(_sampler([[[1, 0]]]), 1, GRPOConfig(), strata="family")
