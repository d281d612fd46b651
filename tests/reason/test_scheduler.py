"""The SSP scheduler: staleness is never exceeded (property test), s = 0 reproduces synchronous GRPO exactly,
the queue's order and drops, and worker errors reaching the caller."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pangu.reason.grpo import GRPOConfig, group_advantages, grpo_objective, truncated_importance_weights
from pangu.reason.scheduler import Rollout, RolloutQueue, SchedulerConfig, run_scheduler

PROMPTS, ARMS, GENERATIONS = 3, 5, 4
CORRECT = np.array([1, 3, 4])


def bandit_generate(delays=None):
  """A tabular policy (logits [prompts, arms]) answering prompt ticket % PROMPTS with G sampled arms."""
  def generate(params, version, ticket):
    if delays is not None:
      time.sleep(delays[ticket % len(delays)])
    prompt = ticket % PROMPTS
    logits = np.asarray(params)[prompt]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    arms = np.random.default_rng(ticket).choice(ARMS, size=GENERATIONS, p=probs)
    rewards = (arms == CORRECT[prompt]).astype(np.float64)
    return Rollout(version=version, ticket=ticket, rewards=rewards, length=int(arms.sum()) + 1,
                   behaviour_logp=np.log(probs[arms]), payload=(prompt, arms))
  return generate


@jax.jit
def _grpo_update(params, prompts, arms, advantages, behaviour_logp):
  def loss(p):
    logp = jax.nn.log_softmax(p[prompts], axis=-1)
    logp = jnp.take_along_axis(logp, arms, axis=-1)  # [groups, G]
    prox = jax.lax.stop_gradient(logp)
    batch = {"old_logp": prox, "ref_logp": prox, "advantages": advantages.reshape(-1),
             "is_weight": truncated_importance_weights(prox, behaviour_logp, 2.0), "mask": jnp.ones_like(logp)}
    rows = lambda x: x.reshape(-1, 1)  # noqa: E731  one token per completion
    batch = {k: (v if k == "advantages" else rows(v)) for k, v in batch.items()}
    return grpo_objective(rows(logp), batch, GRPOConfig(num_generations=GENERATIONS))
  (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(params)
  return params - 0.5 * grad, value, metrics


def bandit_train(params, rollouts, version):
  prompts = jnp.asarray([r.payload[0] for r in rollouts])
  arms = jnp.asarray(np.stack([r.payload[1] for r in rollouts]))
  advantages = group_advantages(jnp.asarray(np.stack([r.rewards for r in rollouts])))
  behaviour = jnp.asarray(np.stack([r.behaviour_logp for r in rollouts]), jnp.float32)
  params, loss, metrics = _grpo_update(params, prompts, arms, advantages, behaviour)
  return params, {"loss": float(loss), "reward": float(np.mean([r.rewards.mean() for r in rollouts])),
                  "ratio": float(metrics["ratio"])}


def synchronous_reference(params, steps, groups_per_step):
  generate, losses = bandit_generate(), []
  for version in range(steps):
    rollouts = [generate(params, version, ticket)
                for ticket in range(version * groups_per_step, (version + 1) * groups_per_step)]
    params, metrics = bandit_train(params, rollouts, version)
    losses.append(metrics["loss"])
  return params, losses


@pytest.mark.parametrize("num_workers", [1, 3])
def test_staleness_zero_reproduces_synchronous_grpo_exactly(num_workers):
  initial = jnp.zeros((PROMPTS, ARMS))
  config = SchedulerConfig(staleness=0, groups_per_step=3, num_workers=num_workers, num_steps=4)
  result = run_scheduler(config, initial, bandit_generate(delays=[0.0, 0.002, 0.0005]), bandit_train)
  params, losses = synchronous_reference(initial, 4, 3)
  assert [step.metrics["loss"] for step in result.steps] == losses
  np.testing.assert_array_equal(np.asarray(result.params), np.asarray(params))
  assert all(s == 0 for step in result.steps for s in step.staleness)
  assert all(step.metrics["ratio"] == 1.0 for step in result.steps)  # importance weights are exactly 1


@settings(max_examples=12, deadline=None)
@given(staleness=st.integers(0, 3), workers=st.integers(1, 4), groups=st.integers(1, 3), steps=st.integers(1, 5),
       priority=st.sampled_from(["variance", "inverse_length", "fifo"]),
       delays=st.lists(st.floats(0.0, 0.004), min_size=1, max_size=6), train_delay=st.floats(0.0, 0.003))
def test_staleness_is_never_exceeded(staleness, workers, groups, steps, priority, delays, train_delay):
  seen = []
  lock = threading.Lock()

  def train(params, rollouts, version):
    with lock:
      seen.extend((version, r.version, r.ticket) for r in rollouts)
    time.sleep(train_delay)
    return params + 1, {}

  config = SchedulerConfig(staleness=staleness, groups_per_step=groups, num_workers=workers, num_steps=steps,
                           priority=priority)
  result = run_scheduler(config, 0, lambda p, v, t: (time.sleep(delays[t % len(delays)]) or
                                                     Rollout(v, t, np.array([t % 2, 0.0]), length=t + 1)), train)
  assert len(seen) == steps * groups == result.trained
  assert all(0 <= learner - behaviour <= staleness for learner, behaviour, _ in seen)
  assert len({ticket for *_, ticket in seen}) == len(seen)  # no rollout trained on twice
  assert result.max_staleness <= staleness and result.params == steps
  assert result.generated >= result.trained + result.dropped


def test_dropped_rollouts_are_replaced_so_drops_do_not_close_the_window():
  """Every fourth rollout is slow and returns past the bound. Pacing by ticket alone lets no worker start more
  than (s + 1) * groups tickets ahead of the learner, dropped ones included, so drops pile up to at most that many
  and then hold the workers back; counted as replaced, the slow ones keep being generated and dropped."""
  config = SchedulerConfig(staleness=1, groups_per_step=1, num_workers=4, num_steps=80)
  generate = lambda p, v, t: (time.sleep(0.03 if t % 4 == 0 else 0.0) or  # noqa: E731
                              Rollout(v, t, np.array([t % 2, 0.0]), length=1))
  result = run_scheduler(config, 0, generate, lambda params, rollouts, version: (params + 1, {}))
  assert result.max_staleness <= 1 and result.trained == 80
  assert result.dropped > 2 * (config.staleness + 1) * config.groups_per_step


def test_queue_takes_freshest_then_highest_priority_and_drops_stale():
  queue, stop = RolloutQueue("variance"), threading.Event()
  queue.push(Rollout(version=0, ticket=0, rewards=np.array([0.0, 1.0]), length=3))  # stale at V=2, s=1
  queue.push(Rollout(version=1, ticket=1, rewards=np.array([1.0, 1.0]), length=3))  # variance 0
  queue.push(Rollout(version=1, ticket=2, rewards=np.array([0.0, 1.0]), length=3))  # variance 0.25
  queue.push(Rollout(version=2, ticket=3, rewards=np.array([1.0, 1.0]), length=3))
  taken, dropped = queue.take(2, version=2, staleness=1, stop=stop)
  assert [r.ticket for r in taken] == [2, 3] and dropped == 1
  taken, dropped = queue.take(1, version=2, staleness=1, stop=stop)
  assert [r.ticket for r in taken] == [1] and dropped == 0


def test_inverse_length_priority_prefers_short_rollouts():
  queue, stop = RolloutQueue("inverse_length"), threading.Event()
  for ticket, length in enumerate([50, 5, 20]):
    queue.push(Rollout(version=0, ticket=ticket, rewards=np.zeros(2), length=length))
  taken, _ = queue.take(1, version=0, staleness=0, stop=stop)
  assert taken[0].length == 5


def test_a_failing_worker_stops_the_run_with_its_error():
  def generate(params, version, ticket):
    if ticket == 2:
      raise RuntimeError("rollout worker crashed")
    return Rollout(version, ticket, np.zeros(2), length=1)

  with pytest.raises(RuntimeError, match="rollout worker crashed"):
    run_scheduler(SchedulerConfig(staleness=1, groups_per_step=2, num_workers=2, num_steps=5), 0, generate,
                  lambda p, r, v: (p, {}))


def test_mistagged_rollouts_are_refused():
  with pytest.raises(ValueError, match="tagged ticket"):
    run_scheduler(SchedulerConfig(num_steps=2), 0, lambda p, v, t: Rollout(v + 1, t, np.zeros(2), 1),
                  lambda p, r, v: (p, {}))


@pytest.mark.parametrize("kwargs, field", [({"staleness": -1}, "staleness"), ({"num_workers": 0}, "num_workers"),
                                           ({"priority": "random"}, "priority"), ({"num_steps": 1.5}, "num_steps")])
def test_config_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    SchedulerConfig(**kwargs)
