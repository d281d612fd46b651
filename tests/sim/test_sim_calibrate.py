"""The calibration's operator profiles: the modules it times are the layers the simulator models, and the fit
recovers known family costs from synthetic profile times."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from pangu.models.transformer import DecoderBlock
from pangu.nn.attention import AttentionMask
from pangu.sim import calibrate, operators
from pangu.sim.shapes import from_config


def _param_count(module: nn.Module, profile: calibrate.LayerProfile) -> int:
  x = jax.ShapeDtypeStruct((profile.batch, profile.seq, profile.d_model), jax.numpy.float32)
  positions = jax.numpy.zeros((profile.batch, profile.seq), jax.numpy.int32)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jax.numpy.zeros(x.shape),
                                                AttentionMask.self_attention(positions)))
  return sum(leaf.size for leaf in jax.tree.leaves(nn.unbox(abstract["params"])))


@pytest.mark.parametrize("profile", calibrate.LAYER_PROFILES)
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_layer_profile_times_the_layer_the_simulator_models(profile, kind):
  config = profile.config(sparse=kind == "moe")
  assert _param_count(DecoderBlock(config), profile) == from_config(config).layer_params(kind).total


def test_optimizer_benchmark_updates_the_reference_decoder():
  reference = calibrate.OPTIMIZER_DECODER
  config = calibrate.decoder_config(reference["d_model"], reference["n_layers"], vocab_size=reference["vocab_size"])
  assert calibrate.optimizer_params() == from_config(config).param_count()


def test_profile_shapes_reject_bad_fields():
  moe = calibrate.LAYER_PROFILES[0].moe
  with pytest.raises(ValueError, match="LayerProfile.seq"):
    calibrate.LayerProfile(batch=1, seq=0, d_model=64, moe=moe)
  with pytest.raises(ValueError, match="HeadProfile.vocab_size"):
    calibrate.HeadProfile(batch=1, seq=8, d_model=64, vocab_size=-1)


def test_fit_recovers_family_costs_from_synthetic_profile_times():
  calibration = calibrate.load()
  device = calibration.topology.device
  # Each family's true cost: a forward scale, a FLOP-bound backward factor, passes over saved activations.
  truth = {"attention": operators.FamilyCost(1.5, 3.0, 10.0), "dense": operators.FamilyCost(0.7, 4.0, 20.0),
           "experts": operators.FamilyCost(1.2, 6.0, 0.0), "head": operators.FamilyCost(0.9, 2.5, 5.0)}
  medians = {}

  def chain(name: str, ops: list[operators.Op], families: tuple[str, ...]):
    """A chain's times: a fixed setup plus R steps of the ops' true forward (and backward, under grad)."""
    costs = {family: truth[family] for family in families}
    forward = operators.forward_seconds(ops, device, "float32", costs)
    backward = operators.forward_seconds(ops, device, "float32", costs, backward=True)
    for repeat in calibrate.PROFILE_CHAIN:
      medians[f"{name}/forward/{repeat}"] = 0.01 + repeat * forward
      medians[f"{name}/grad/{repeat}"] = 0.02 + repeat * (forward + backward)

  for index, profile in enumerate(calibrate.LAYER_PROFILES):
    dense, moe = (calibrate.layer_profile_ops(profile, kind) for kind in ("dense", "moe"))
    chain(f"profile/attention/{index}", [op for op in dense if op.family == "attention"], ("attention",))
    chain(f"profile/dense/{index}", dense, ("attention", "dense"))
    chain(f"profile/experts/{index}", moe, ("attention", "dense", "experts"))
  for index, profile in enumerate(calibrate.HEAD_PROFILES):
    chain(f"profile/head/{index}", calibrate.head_ops(profile), ("head",))

  fitted = calibrate.fit_op_costs(medians, calibration.record["device"])
  for family, cost in truth.items():
    assert fitted[family]["forward_scale"] == pytest.approx(cost.forward_scale, rel=1e-6)
    assert fitted[family]["backward_factor"] == pytest.approx(cost.backward_factor, rel=1e-6)
    assert fitted[family]["saved_passes"] == pytest.approx(cost.saved_passes, rel=1e-6, abs=1e-6)
    assert fitted[family]["backward_fit_errors"] == pytest.approx([0.0] * len(fitted[family]["shapes"]), abs=1e-6)


def test_attention_block_ops_form_the_attention_family():
  config = calibrate.decoder_config(128, 2)
  ctx = operators.OpContext(tokens=256, kv_len=128, activation_bytes=4, weight_bytes=4, fused_attention=False)
  ops = operators.layer_ops(from_config(config), "dense", ctx)
  families = {op.name: op.family for op in ops}
  assert {name for name, family in families.items() if family == "attention"} == {
      "attention_norm", "qkv_projection", "rope", "attention_scores", "softmax", "attention_values",
      "output_projection"}
  assert families["ffn_gate_up"] == families["ffn_norm"] == "dense"
  assert {op.family for op in operators.head_ops(from_config(config), ctx)} == {"head"}


def test_alpha_beta_fit_recovers_known_constants_despite_an_outlier():
  alpha, beta, size = 3e-5, 2e-9, 4
  exact = [{"kind": kind, "bytes": nbytes, "seconds": calibrate.PHASES[kind] * (alpha + (size - 1) / size * nbytes * beta)}
           for kind in calibrate.COLLECTIVES for nbytes in calibrate.COLLECTIVE_BYTES]
  assert calibrate.fit_alpha_beta(exact, size) == pytest.approx((alpha, beta), rel=1e-6)
  for index in range(len(exact)):
    points = [dict(p) for p in exact]
    points[index]["seconds"] *= 4.0  # one measurement hit by a burst of load
    assert calibrate.fit_alpha_beta(points, size) == pytest.approx((alpha, beta), rel=0.01)
  # Plain least squares on relative error (the fit before) is pulled far off by such an outlier.
  points = [dict(p) for p in exact]
  points[0]["seconds"] *= 4.0
  phases = np.array([calibrate.PHASES[p["kind"]] for p in points], float)
  volume = np.array([p["bytes"] for p in points], float) * (size - 1) / size
  seconds = np.array([p["seconds"] for p in points])
  (plain_alpha, _), *_ = np.linalg.lstsq(np.stack([phases, phases * volume], 1) / seconds[:, None],
                                         np.ones_like(seconds), rcond=None)
  assert abs(plain_alpha / alpha - 1) > 0.3


def test_time_rounds_shuffles_each_round_and_drops_the_warm_up():
  calls = []
  benchmarks = [calibrate.Benchmark(str(i), lambda i=i: calls.append(i)) for i in range(6)]
  times = calibrate.time_rounds(benchmarks, rounds=3, log=lambda _: None, warmup_rounds=1)
  assert all(len(times[str(i)]) == 3 for i in range(6))  # the warm-up round is not recorded
  rounds = [calls[6 * r:6 * (r + 1)] for r in range(4)]
  assert len(calls) == 24 and all(sorted(r) == list(range(6)) for r in rounds)
  assert len({tuple(r) for r in rounds}) > 1  # not the same fixed order every round
  assert calibrate.best_of([0.3, 0.1, 0.2]) == 0.1


def test_stability_reports_how_far_each_constant_moves():
  record = calibrate.load().record
  other = {**record, "op_costs": {**record["op_costs"],
                                  "dense": {**record["op_costs"]["dense"],
                                            "forward_scale": 3 * record["op_costs"]["dense"]["forward_scale"]}}}
  moved = calibrate.stability(record, other)
  assert moved["constants"]["dense/forward_scale"]["change"] == pytest.approx(2.0)
  assert moved["largest"] == {"name": "dense/forward_scale", "change": pytest.approx(2.0)}
  assert moved["median_abs_change"] == 0.0
  assert calibrate.stability(record, record)["largest"]["change"] == 0.0


def test_expert_parallel_profiles_cover_both_exchanges():
  assert {profile.dispatch for profile in calibrate.EP_PROFILES} == {"flat", "ring"}
  assert {profile.dispatch for profile in calibrate.EP_PROFILES[:2]} == {"flat", "ring"}  # quick mode
  with pytest.raises(ValueError, match="ExpertParallelProfile.ep"):
    calibrate.ExpertParallelProfile(calibrate.LAYER_PROFILES[0], ep=3)


def test_ep_fit_recovers_known_exchange_costs_from_synthetic_profile_times():
  from pangu.sim.plan import FP32, Plan, TrainWorkload
  from pangu.sim.training import ExchangeCost, layer_cost
  base = calibrate.from_record({k: v for k, v in calibrate.load().record.items() if k != "ep_costs"})
  truth = {"ring": ExchangeCost(1.8, 2.6), "flat": ExchangeCost(0.9, 1.3)}
  options = dataclasses.replace(base.options, ep_costs=tuple(truth.items()))
  best = {}
  for index, profile in enumerate(calibrate.EP_PROFILES):
    layer = profile.layer
    plan = Plan(dp=8, ep=profile.ep, micro_batch=layer.batch, sequence_parallel=False, zero_stage=0,
                ep_dispatch=profile.dispatch)
    cost = layer_cost(from_config(layer.config(sparse=True)), "moe", plan, TrainWorkload(layer.seq, 8 * layer.batch),
                      base.topology, FP32, options)
    for repeat in calibrate.PROFILE_CHAIN:
      best[f"ep/{index}/forward/{repeat}"] = 0.01 + repeat * cost.forward
      best[f"ep/{index}/grad/{repeat}"] = 0.02 + repeat * (cost.forward + cost.backward)
  fitted = calibrate.fit_ep_costs(best, base)
  for dispatch, cost in truth.items():
    assert fitted[dispatch]["forward_scale"] == pytest.approx(cost.forward_scale, rel=1e-6)
    assert fitted[dispatch]["backward_scale"] == pytest.approx(cost.backward_scale, rel=1e-6)


def test_ep_costs_scale_only_moe_layers_under_expert_parallelism():
  from pangu.sim import validation
  from pangu.sim.training import ExchangeCost
  base = calibrate.from_record({k: v for k, v in calibrate.load().record.items() if k != "ep_costs"})
  scaled = dataclasses.replace(base, options=dataclasses.replace(
      base.options, ep_costs=(("ring", ExchangeCost(2.0, 2.0)), ("flat", ExchangeCost(2.0, 2.0)))))
  cases = {case.name: case for case in validation.CASES}
  for name in ("d256_l2_dp8", "d256_l2_dp4_tp2"):  # dense: unchanged
    assert validation.predict(cases[name], scaled) == validation.predict(cases[name], base)
  for name in ("topk_d256_l2_dp4_ep2", "moge_d128_l2_dp4_ep2"):
    assert validation.predict(cases[name], scaled) > validation.predict(cases[name], base)
