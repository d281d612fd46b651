"""DiT post-training quantisation: quantisers, the int8 path, contiguous grouping against brute force, and the
re-parameterisation's exactness (spec section 5)."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu.compress.quant.calibration import attention_operands, collect_input_stats, layer_entry, quantised_layers
from pangu.compress.quant.grouping import common_refinement, contiguous_groups, nearest_calibrated, uniform_steps
from pangu.compress.quant.ptq import PTQConfig, quantise_dit
from pangu.compress.quant.reparam import reparameterise
from pangu.compress.quant.smoothing import HTGConfig, SmoothingPlan, SmoothQuantConfig, ema_from_noisy, htg_plan
from pangu.models.dit import DiT, DiTConfig, init_dit
from pangu.nn.quantized import fake_quant_activation, fake_quant_weight, int8_matmul, symmetric_scale

CONFIG = DiTConfig(d_model=16, depth=2, n_heads=2)
STEPS = 6


def _random_params(seed=0):
  """Every param non-zero (the adaLN-Zero init would make the folds trivially exact)."""
  params = init_dit(CONFIG, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])


def _inputs(batch=3, seed=2):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k1, (batch, 8, 8, 1)), jax.random.randint(k2, (batch,), 0, 1000),
          jnp.arange(batch) % 11)


# Quantisers and the integer path.

def test_weight_fake_quant_error_at_most_half_a_step():
  w = jax.random.normal(jax.random.key(0), (32, 8))
  for bits in (8, 4):
    scale = np.asarray(symmetric_scale(w, bits, axis=0))
    err = np.abs(np.asarray(fake_quant_weight(w, bits)) - np.asarray(w))
    assert np.all(err <= scale / 2 + 1e-7)
    levels = np.unique(np.round(np.asarray(fake_quant_weight(w, bits)) / scale))
    assert levels.min() >= -(2 ** (bits - 1) - 1) and levels.max() <= 2 ** (bits - 1) - 1


def test_int4_weights_symmetric_per_output_channel_float64():
  """Against a float64 reference: column j of a [C_in, C_out] kernel is rounded on its own grid
  max_i |W[i, j]| / 7 * {-7..7} (one scale per output channel, zero exact)."""
  w = np.random.default_rng(0).normal(size=(24, 6)) * np.array([0.01, 0.1, 1.0, 10.0, 3.0, 0.5])
  step = np.abs(w).max(axis=0) / 7
  expected = np.clip(np.round(w / step), -7, 7) * step
  np.testing.assert_allclose(fake_quant_weight(jnp.asarray(w, jnp.float32), 4), expected, rtol=1e-5, atol=1e-7)


def test_activation_fake_quant_grid():
  x = jnp.linspace(-1.3, 2.9, 1000)
  out = np.asarray(fake_quant_activation(x, jnp.float32(-1.3), jnp.float32(2.9), 8))
  step = 4.2 / 255
  assert np.abs(out - np.asarray(x)).max() <= step / 2 + 1e-6
  assert len(np.unique(np.round(out / step, 3))) <= 256


def test_int8_path_equals_fake_quant_to_rounding():
  kx, kw = jax.random.split(jax.random.key(0))
  x = 2.0 * jax.random.normal(kx, (5, 7, 48)) + 0.5
  w = jax.random.normal(kw, (48, 24))
  lo, hi = x.min(), x.max()
  scale = symmetric_scale(w, 8, axis=0)
  w_int8 = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
  integer = int8_matmul(x, lo, hi, w_int8, scale[0])
  reference = np.asarray(fake_quant_activation(x, lo, hi, 8), np.float64) @ np.asarray(fake_quant_weight(w, 8),
                                                                                        np.float64)
  np.testing.assert_allclose(integer, reference, rtol=1e-5, atol=1e-4)


# Contiguous hierarchical grouping.

def _naive_contiguous(vectors, n_groups):
  """Float64 reference: clusters as lists of steps, centroids recomputed from scratch every merge."""
  clusters = [[i] for i in range(len(vectors))]
  while len(clusters) > n_groups:
    centroids = [vectors[c].mean(0) for c in clusters]
    gaps = [np.sum((centroids[j + 1] - centroids[j]) ** 2) for j in range(len(clusters) - 1)]
    j = int(np.argmin(gaps))
    clusters[j:j + 2] = [clusters[j] + clusters[j + 1]]
  return np.concatenate([[g] * len(c) for g, c in enumerate(clusters)])


@pytest.mark.parametrize("seed", range(5))
def test_grouping_matches_naive_merge(seed):
  vectors = np.random.default_rng(seed).normal(size=(12, 3))
  for n_groups in (1, 2, 4, 7, 12):
    np.testing.assert_array_equal(contiguous_groups(vectors, n_groups), _naive_contiguous(vectors, n_groups))


def _best_segmentation(vectors, n_groups):
  """Brute force over every split into n_groups intervals: the least within-group sum of squares."""
  best, best_cost = None, np.inf
  for cuts in itertools.combinations(range(1, len(vectors)), n_groups - 1):
    bounds = (0, *cuts, len(vectors))
    cost = sum(np.sum((vectors[a:b] - vectors[a:b].mean(0)) ** 2) for a, b in zip(bounds, bounds[1:]))
    if cost < best_cost:
      best, best_cost = bounds, cost
  return np.concatenate([[g] * (b - a) for g, (a, b) in enumerate(zip(best, best[1:]))])


@pytest.mark.parametrize("seed", range(4))
def test_grouping_recovers_the_optimal_intervals_of_piecewise_data(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 4, size=4)
  levels = rng.normal(scale=5.0, size=(4, 3))
  vectors = np.concatenate([lv + 0.05 * rng.normal(size=(n, 3)) for lv, n in zip(levels, lengths)])
  np.testing.assert_array_equal(contiguous_groups(vectors, 4), _best_segmentation(vectors, 4))


def test_common_refinement():
  a, b = np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(common_refinement(a, b), [0, 1, 1, 2, 3, 3])


def test_ema_runs_from_the_noisiest_step():
  r = np.array([[4.0], [0.0], [0.0]])
  np.testing.assert_allclose(ema_from_noisy(r, 0.5), [1.0])
  with pytest.raises(ValueError, match="alpha"):
    HTGConfig(alpha=1.0)


# Re-parameterisation.

def _random_plans(n_groups, seed=0):
  rng = np.random.default_rng(seed)
  plans = {}
  for block, name in quantised_layers(CONFIG):
    width = CONFIG.d_ff if name == "fc2" else CONFIG.d_model
    cuts = np.sort(rng.choice(np.arange(1, STEPS), n_groups - 1, replace=False))
    groups = np.searchsorted(cuts, np.arange(STEPS), side="right").astype(np.int32)
    plans[(block, name)] = SmoothingPlan(groups, rng.normal(size=(n_groups, width)),
                                         np.exp(rng.normal(scale=0.5, size=width)))
  return plans


@pytest.mark.parametrize("n_groups, proj_smoothing", [(1, "fold_v"), (3, "fold_v"), (STEPS, "explicit")])
def test_reparameterisation_is_exact_without_quantisation(proj_smoothing, n_groups):
  params = _random_params()
  folded, quant = reparameterise(CONFIG, params, _random_plans(n_groups), STEPS, proj_smoothing)
  model, (x, t, y) = DiT(CONFIG), _inputs()
  apply = jax.jit(lambda variables, step: model.apply(variables, x, t, y, step))
  for step in range(STEPS):  # every step, across every group boundary
    np.testing.assert_allclose(apply({"params": folded, "quant": quant}, step), apply({"params": params}, step),
                               atol=1e-5, rtol=1e-5)


def test_smoothed_inputs_are_what_the_plan_says():
  """The folded model's qkv / proj / fc1 / fc2 inputs equal (X - z_g) / s of the float model's inputs."""
  params, plans = _random_params(), _random_plans(2)
  folded, quant = reparameterise(CONFIG, params, plans, STEPS)
  model, (x, t, y) = DiT(CONFIG), _inputs()
  step = 4
  _, raw = model.apply({"params": params}, x, t, y, step, mutable=["intermediates"])
  _, smoothed = model.apply({"params": folded, "quant": quant}, x, t, y, step, mutable=["intermediates"])
  for block, name in quantised_layers(CONFIG):
    plan = plans[(block, name)]
    expected = (raw["intermediates"][block][name]["input"][0] - plan.shift[plan.group_of_step[step]]) / plan.scale
    np.testing.assert_allclose(smoothed["intermediates"][block][name]["input"][0], expected, atol=2e-5, rtol=1e-4)


def _calibration(batch=4):
  """(trajectory [S, B, 8, 8, 1], timesteps [S], labels [B]): inputs growing with the step."""
  x, _, y = _inputs(batch=batch)
  return jnp.stack([x * (1 + 0.5 * i) for i in range(STEPS)]), np.linspace(900, 0, STEPS).astype(np.int32), y % 10


def _step_inputs(variables, trajectory, timesteps, labels, guidance, step):
  """{key: [rows, C]} float64 of every linear's input and attention operand at one step, read back from one model
  run: with guidance both CFG halves, without it (1.0: the sampler runs the conditional batch once) the
  conditional batch alone."""
  halves = 1 if guidance == 1.0 else 2
  run_labels = jnp.concatenate([labels, jnp.full_like(labels, CONFIG.n_classes)])[:halves * len(labels)]
  x = jnp.concatenate([trajectory[step]] * halves)
  _, state = DiT(CONFIG).apply(variables, x, jnp.full(run_labels.shape, timesteps[step]), run_labels, step,
                               mutable=["intermediates"])
  inputs = {}
  for key in quantised_layers(CONFIG, all_linears=True) + attention_operands(CONFIG):
    entry = layer_entry(state["intermediates"], key)
    if isinstance(entry, dict):  # a linear's input [..., C_in]
      value = np.asarray(entry["input"][0], np.float64)
      inputs[key] = value.reshape(-1, value.shape[-1])
    else:  # an attention operand [B, N, A, Dh]: channels are (head, head dimension)
      inputs[key] = np.asarray(entry[0], np.float64).reshape(-1, CONFIG.d_model)
  return inputs


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_input_stats_are_each_steps_channel_extremes(guidance):
  """Against one model run per step with its intermediates read back."""
  params, (trajectory, timesteps, labels) = _random_params(), _calibration(batch=3)
  stats = collect_input_stats(CONFIG, params, None, trajectory, timesteps, labels, guidance)
  for step in (0, STEPS - 1):
    for key, flat in _step_inputs({"params": params}, trajectory, timesteps, labels, guidance, step).items():
      np.testing.assert_allclose(stats[key]["min"][step], flat.min(0), rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(stats[key]["max"][step], flat.max(0), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="timesteps"):
    collect_input_stats(CONFIG, params, None, trajectory, timesteps[1:], labels, 1.5)


@pytest.mark.parametrize("method, proj_smoothing", [("htg", "fold_v"), ("htg", "explicit"), ("smoothquant", "fold_v"),
                                                    ("ptq4dit", "fold_v")])
def test_smoothed_stats_equal_the_folded_models(method, proj_smoothing):
  """The closed form `quantise_dit` uses for the activation ranges against the re-parameterised float model run
  over the same trajectory."""
  from pangu.compress.quant.ptq import smoothed_stats, smoothing_plans
  params, (trajectory, timesteps, labels) = _random_params(), _calibration()
  stats = collect_input_stats(CONFIG, params, None, trajectory, timesteps, labels, 1.5)
  plans = smoothing_plans(CONFIG, params, stats, PTQConfig(method))
  folded, quant = reparameterise(CONFIG, params, plans, STEPS, proj_smoothing)
  rerun = collect_input_stats(CONFIG, folded, quant, trajectory, timesteps, labels, 1.5)
  closed_form = smoothed_stats(stats, plans)
  assert set(plans) == set(quantised_layers(CONFIG))
  for key in quantised_layers(CONFIG):
    for extreme in ("min", "max"):
      assert not np.allclose(closed_form[key][extreme], stats[key][extreme], rtol=1e-2)  # the smoothing acts
      np.testing.assert_allclose(closed_form[key][extreme], rerun[key][extreme], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_input_moments_against_the_read_back_inputs(guidance):
  from pangu.compress.quant.calibration import collect_input_moments
  params, (trajectory, timesteps, labels) = _random_params(), _calibration(batch=3)
  moments = collect_input_moments(CONFIG, params, None, trajectory, timesteps, labels, guidance)
  inputs = [_step_inputs({"params": params}, trajectory, timesteps, labels, guidance, step) for step in range(STEPS)]
  assert set(moments) == set(quantised_layers(CONFIG, all_linears=True))
  for key, entry in moments.items():
    assert entry["count"] == len(inputs[0][key])
    np.testing.assert_allclose(entry["sum"], [x[key].sum(0) for x in inputs], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(entry["gram"], sum(x[key].T @ x[key] for x in inputs), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("method, compensation", [("htg", "quantised"), ("htg", "float"), ("smoothquant", "float")])
def test_input_hessian_is_the_gram_of_what_the_rounding_error_multiplies(method, compensation):
  """From the float model's moments in closed form, against the re-parameterised model's inputs X_hat read back:
  X_hat + z_g / s when the shift's bias term is folded onto the rounded kernel, X_hat itself when onto the float
  one (spec 3.7's form; SmoothQuant-style has no shift, so both are X / s)."""
  from pangu.compress.quant.calibration import collect_input_moments
  from pangu.compress.quant.ptq import input_hessian, smoothing_plans
  params, (trajectory, timesteps, labels) = _random_params(), _calibration(batch=3)
  stats = collect_input_stats(CONFIG, params, None, trajectory, timesteps, labels, 1.5)
  moments = collect_input_moments(CONFIG, params, None, trajectory, timesteps, labels, 1.5)
  plans = smoothing_plans(CONFIG, params, stats, PTQConfig(method, htg=HTGConfig(n_groups=2)))
  folded, quant = reparameterise(CONFIG, params, plans, STEPS)
  inputs = [_step_inputs({"params": folded, "quant": quant}, trajectory, timesteps, labels, 1.5, step)
            for step in range(STEPS)]
  for key, plan in plans.items():
    offsets = (plan.shift_per_step() / plan.scale if compensation == "quantised" else np.zeros((STEPS, 1)))
    want = sum((x[key] + offsets[step]).T @ (x[key] + offsets[step]) for step, x in enumerate(inputs))
    got = input_hessian(moments[key], plan, compensation)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_gptq_rounding_in_quantise_dit():
  """GPTQ keeps round-to-nearest's grid (scales, bytes, the int8 path at W8 equal to fake-quant), moves only the
  levels, and needs the moments."""
  from pangu.compress.quant.calibration import collect_input_moments
  params, (trajectory, timesteps, labels) = _random_params(), _calibration()
  stats = collect_input_stats(CONFIG, params, None, trajectory, timesteps, labels, 1.5)
  moments = collect_input_moments(CONFIG, params, None, trajectory, timesteps, labels, 1.5)
  nearest, _, nearest_report = quantise_dit(CONFIG, params, stats, PTQConfig("htg", weight_bits=4))
  ptq = PTQConfig("htg", weight_bits=4, weight_rounding="gptq")
  gptq, _, gptq_report = quantise_dit(CONFIG, params, stats, ptq, moments=moments)
  assert gptq_report["weight_bytes"] == nearest_report["weight_bytes"]
  for key in quantised_layers(CONFIG):
    a, b = np.asarray(layer_entry(gptq, key)["kernel"]), np.asarray(layer_entry(nearest, key)["kernel"])
    scale = np.abs(b).max(0) / 7
    np.testing.assert_allclose(np.round(a / scale), a / scale, atol=1e-4)  # on round-to-nearest's grid
    assert not np.allclose(a, b)
  model, (x, t, y) = DiT(CONFIG), _inputs(batch=4)
  fake = quantise_dit(CONFIG, params, stats, dataclasses.replace(ptq, weight_bits=8), moments=moments)
  real = quantise_dit(CONFIG, params, stats, dataclasses.replace(ptq, weight_bits=8, integer=True), moments=moments)
  np.testing.assert_allclose(model.apply({"params": real[0], "quant": real[1]}, x, t, y, 2),
                             model.apply({"params": fake[0], "quant": fake[1]}, x, t, y, 2), atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="quantise_dit needs `moments`"):
    quantise_dit(CONFIG, params, stats, ptq)


def test_smoothing_scale_must_be_positive():
  with pytest.raises(ValueError, match="scale must be positive"):
    SmoothingPlan(np.zeros(2, np.int32), np.zeros((1, 3)), np.array([1.0, 0.0, 2.0]))


@pytest.mark.slow
def test_quantised_model_tracks_float_and_int8_matches_fake_quant():
  params, (trajectory, timesteps, labels) = _random_params(), _calibration()
  stats = collect_input_stats(CONFIG, params, None, trajectory, timesteps, labels, 1.5)
  model, (x, t, y) = DiT(CONFIG), _inputs(batch=4)
  float_out = np.asarray(model.apply({"params": params}, x, t, y, 2))
  errors = {}
  for bits in (8, 4):
    qparams, quant, report = quantise_dit(CONFIG, params, stats, PTQConfig("htg", weight_bits=bits))
    out = np.asarray(model.apply({"params": qparams, "quant": quant}, x, t, y, 2))
    errors[bits] = np.linalg.norm(out - float_out) / np.linalg.norm(float_out)
    assert report["extra_bytes"] > 0
  assert errors[8] < 0.25 and errors[8] < errors[4]
  fake = quantise_dit(CONFIG, params, stats, PTQConfig("htg", weight_bits=8))
  real = quantise_dit(CONFIG, params, stats, PTQConfig("htg", weight_bits=8, integer=True))
  assert real[1]["block_0"]["qkv"]["kernel_int8"].dtype == jnp.int8
  np.testing.assert_allclose(model.apply({"params": real[0], "quant": real[1]}, x, t, y, 2),
                             model.apply({"params": fake[0], "quant": fake[1]}, x, t, y, 2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["naive", "smoothquant", "htg"])
def test_float_bits_split_the_quantised_model_into_its_weights_and_activations(method):
  """weight_bits / act_bits None leave that side in float and the rest as the W4A8 model has it: W4A16 the same
  rounded kernels with no activation ranges, W16A8 the same ranges on the folded float kernels; with neither side
  quantised the folded model is the float model (the re-parameterisation is exact)."""
  params, (trajectory, timesteps, labels) = _random_params(), _calibration()
  stats = collect_input_stats(CONFIG, params, None, trajectory, timesteps, labels, 1.5)
  w4a8 = PTQConfig(method, weight_bits=4)
  both_params, both_quant, both_report = quantise_dit(CONFIG, params, stats, w4a8)
  w_params, w_quant, _ = quantise_dit(CONFIG, params, stats, dataclasses.replace(w4a8, act_bits=None))
  a_params, a_quant, _ = quantise_dit(CONFIG, params, stats, dataclasses.replace(w4a8, weight_bits=None))
  f_params, f_quant, f_report = quantise_dit(CONFIG, params, stats, PTQConfig(method, weight_bits=None,
                                                                              act_bits=None))
  ranges = {path: table for path, table in _step_tables(both_quant).items() if path[-1] == "act_range"}
  assert len(ranges) == len(quantised_layers(CONFIG))
  assert not any(path[-1] == "act_range" for path in _step_tables(w_quant))
  jax.tree.map(np.testing.assert_array_equal, w_params, both_params)
  jax.tree.map(np.testing.assert_array_equal, a_params, f_params)
  for path, table in _step_tables(a_quant).items():
    if path[-1] == "act_range":
      jax.tree.map(np.testing.assert_array_equal, table, ranges[path])
  for key in quantised_layers(CONFIG):
    assert not np.allclose(layer_entry(a_params, key)["kernel"], layer_entry(both_params, key)["kernel"])
  assert f_report["weight_bytes"] == 4 * sum(layer_entry(params, key)["kernel"].size
                                             for key in quantised_layers(CONFIG)) > both_report["weight_bytes"]
  model, (x, t, y) = DiT(CONFIG), _inputs()
  for step in (0, STEPS - 1):
    np.testing.assert_allclose(model.apply({"params": f_params, "quant": f_quant}, x, t, y, step),
                               model.apply({"params": params}, x, t, y, step), atol=1e-5, rtol=1e-5)


def test_float_activations_rule_out_the_integer_path_and_quantised_attention():
  with pytest.raises(ValueError, match="integer needs weight_bits=8 and act_bits=8"):
    PTQConfig(integer=True, act_bits=None)
  with pytest.raises(ValueError, match="quantise_attention .* act_bits is None"):
    PTQConfig(quantise_attention=True, act_bits=None)
  with pytest.raises(ValueError, match="PTQConfig.weight_bits must be one of"):
    PTQConfig(weight_bits=2)


def test_htg_plan_groups_and_scale():
  rng = np.random.default_rng(0)
  lo = np.concatenate([np.full((5, 4), -1.0), np.full((5, 4), 2.0)]) + 0.01 * rng.normal(size=(10, 4))
  stats = {"min": lo, "max": lo + 2.0}
  kernel = np.full((4, 3), 4.0)
  plan = htg_plan(stats, kernel, HTGConfig(n_groups=2, alpha=0.0))
  np.testing.assert_array_equal(plan.group_of_step, [0] * 5 + [1] * 5)
  np.testing.assert_allclose(plan.shift, [[0.0] * 4, [3.0] * 4], atol=0.02)
  # alpha = 0: m is the cleanest step's half range (1.0); s = sqrt(1 / 4).
  np.testing.assert_allclose(plan.scale, 0.5, atol=0.01)


def test_htg_scale_is_the_spec_ema_against_float64():
  """Spec 3.6 with alpha = 0.99: r_t = max_n (X_t - z_t), m_T = r_T, m_t = alpha m_{t+1} + (1 - alpha) r_t down to
  the cleanest step, s = sqrt(m_1 / max_j |W[i, j]|); step index 0 is the noisiest (t = T)."""
  rng = np.random.default_rng(1)
  lo = rng.normal(size=(15, 5)) - 2.0
  hi = lo + rng.uniform(0.5, 4.0, size=(15, 5))
  kernel = rng.normal(size=(5, 3))
  plan = htg_plan({"min": lo, "max": hi}, kernel, HTGConfig(alpha=0.99))
  r = (hi - lo) / 2  # max_n (X_t - z_t) with z_t the midpoint
  m = r[0]
  for t in range(1, 15):
    m = 0.99 * m + 0.01 * r[t]
  np.testing.assert_allclose(plan.scale, np.sqrt(m / np.abs(kernel).max(axis=1)), rtol=1e-12)
  reversed_m = r[-1]  # the EMA run the wrong way (clean to noisy) is measurably different here
  for t in range(13, -1, -1):
    reversed_m = 0.99 * reversed_m + 0.01 * r[t]
  assert np.abs(np.sqrt(reversed_m / np.abs(kernel).max(axis=1)) - plan.scale).max() > 1e-3
  # Our extension: Eq. 7's exponent opened as SmoothQuant's migration strength, s = m_1^a / max|W|^(1 - a).
  migrated = htg_plan({"min": lo, "max": hi}, kernel, HTGConfig(alpha=0.99, migration=0.3))
  np.testing.assert_allclose(migrated.scale, m ** 0.3 / np.abs(kernel).max(axis=1) ** 0.7, rtol=1e-12)
  np.testing.assert_array_equal(migrated.shift, plan.shift)
  for bad in (0.0, 1.0):
    with pytest.raises(ValueError, match="HTGConfig.migration"):
      HTGConfig(migration=bad)


def test_baseline_plans_closed_form():
  from pangu.compress.quant.smoothing import ptq4dit_plan, smoothquant_plan
  stats = {"min": np.array([[-1.0, -4.0], [-3.0, 0.0]]), "max": np.array([[2.0, 1.0], [1.0, 16.0]])}
  kernel = np.array([[4.0, -1.0], [0.5, 0.25]])
  sq, balanced = smoothquant_plan(stats, kernel), ptq4dit_plan(stats, kernel)
  # max|X| per channel: over steps [3, 16] (SmoothQuant-style), mean over steps [2.5, 10] (PTQ4DiT-style).
  np.testing.assert_allclose(sq.scale, np.sqrt(np.array([3.0, 16.0]) / np.array([4.0, 0.5])))
  np.testing.assert_allclose(balanced.scale, np.sqrt(np.array([2.5, 10.0]) / np.array([4.0, 0.5])))
  # Migration strength a: s = max|X|^a / max|W|^(1 - a) (SmoothQuant's Eq. 4); 1/2 is the square root above.
  migrated = smoothquant_plan(stats, kernel, migration=0.3)
  np.testing.assert_allclose(migrated.scale, np.array([3.0, 16.0]) ** 0.3 / np.array([4.0, 0.5]) ** 0.7)
  for plan in (sq, balanced, migrated):
    np.testing.assert_array_equal(plan.shift, 0.0)
    np.testing.assert_array_equal(plan.group_of_step, [0, 0])
  for bad in (0.0, 1.0):
    with pytest.raises(ValueError, match="migration"):
      SmoothQuantConfig(migration=bad)
  with pytest.raises(ValueError, match="SmoothQuantConfig.scaled_layers"):
    SmoothQuantConfig(scaled_layers=("fc2", "final"))


# HTG settings left open by the paper: which inputs get the channel scale, and calibration-picked constants.

def _synthetic_stats(seed=0, n_steps=STEPS):
  """Per-step channel min / max of every quantised linear, drifting with the step (no model run)."""
  rng = np.random.default_rng(seed)
  stats = {}
  for block, name in quantised_layers(CONFIG):
    width = CONFIG.d_ff if name == "fc2" else CONFIG.d_model
    lo = rng.normal(size=(n_steps, width)) + np.linspace(-1, 1, n_steps)[:, None]
    stats[(block, name)] = {"min": lo, "max": lo + rng.uniform(0.5, 3.0, size=(n_steps, width))}
  return stats


def test_unscaled_layers_keep_the_shift_alone():
  from pangu.compress.quant.ptq import smoothing_plans
  params, stats = _random_params(), _synthetic_stats()
  everything = smoothing_plans(CONFIG, params, stats, PTQConfig("htg"))
  no_fc2 = smoothing_plans(CONFIG, params, stats, PTQConfig("htg", htg=HTGConfig(scaled_layers=("qkv", "proj",
                                                                                                  "fc1"))))
  for key in quantised_layers(CONFIG):
    np.testing.assert_array_equal(no_fc2[key].group_of_step, everything[key].group_of_step)
    np.testing.assert_allclose(no_fc2[key].shift, everything[key].shift)
    if key[1] == "fc2":
      np.testing.assert_array_equal(no_fc2[key].scale, 1.0)
      assert np.abs(everything[key].scale - 1.0).max() > 1e-2
    else:
      np.testing.assert_allclose(no_fc2[key].scale, everything[key].scale)
  with pytest.raises(ValueError, match="scaled_layers"):
    HTGConfig(scaled_layers=("qkv", "adaLN"))


def test_smoothquant_leaves_unscaled_layers_alone():
  """A linear outside SmoothQuantConfig.scaled_layers keeps its float kernel before rounding and its own input
  range; the others are smoothed as with every layer scaled."""
  params, stats = _random_params(), _synthetic_stats()
  quantised = {layers: quantise_dit(CONFIG, params, stats, PTQConfig(
      "smoothquant", weight_bits=4, smoothquant=SmoothQuantConfig(migration=0.4, scaled_layers=layers)))
      for layers in (("qkv", "proj", "fc1", "fc2"), ("qkv", "proj", "fc1"))}
  (everything, _, all_report), (no_fc2, no_fc2_quant, no_fc2_report) = quantised.values()
  minmax, minmax_quant, _ = quantise_dit(CONFIG, params, stats, PTQConfig("minmax", weight_bits=4))
  assert sorted(no_fc2_report["plans"]) == sorted(k for k in all_report["plans"] if k[1] != "fc2")
  for key in quantised_layers(CONFIG):
    ours, reference = (layer_entry(p, key)["kernel"] for p in (no_fc2, everything if key[1] != "fc2" else minmax))
    np.testing.assert_array_equal(ours, reference)
    if key[1] == "fc2":
      np.testing.assert_array_equal(layer_entry(no_fc2_quant, key)["act_range"]["values"],
                                    layer_entry(minmax_quant, key)["act_range"]["values"])
      assert np.abs(np.asarray(layer_entry(everything, key)["kernel"]) - np.asarray(ours)).max() > 1e-3


@pytest.mark.parametrize("proj_smoothing", ["fold_v", "explicit"])
def test_shift_compensation_cancels_through_the_rounded_kernel(proj_smoothing):
  """Each smoothed layer computes X_hat K + bias_g with X_hat = (X - z_g) / s. With the compensation on the
  rounded kernel Q, bias_g = rest_g + (z_g / s) Q, so the shift cancels through Q exactly (rest_g: what the float
  fold's bias holds besides (z_g / s) W_hat); the spec's float form leaves (z_g / s) (W_hat - Q)."""
  params, stats = _random_params(), _synthetic_stats(2)
  for compensation in ("quantised", "float"):
    ptq = PTQConfig("htg", weight_bits=4, proj_smoothing=proj_smoothing,
                    htg=HTGConfig(shift_compensation=compensation))
    qparams, quant, report = quantise_dit(CONFIG, params, stats, ptq)
    folded, folded_quant = reparameterise(CONFIG, params, report["plans"], STEPS, proj_smoothing)
    for (block, name), plan in report["plans"].items():
      w_hat = np.asarray(folded[block][name]["kernel"], np.float64)
      rounded = np.asarray(qparams[block][name]["kernel"], np.float64)
      for step in range(STEPS):
        def bias(q):
          table = q[block][name]["bias_table"]
          return np.asarray(table["values"], np.float64)[int(table["group_of_step"][step])]
        z = plan.shift_per_step()[step] / plan.scale
        leftover = bias(quant) - z @ rounded - (bias(folded_quant) - z @ w_hat)
        expected = np.zeros_like(leftover) if compensation == "quantised" else z @ (w_hat - rounded)
        np.testing.assert_allclose(leftover, expected, atol=1e-4 * (1 + np.abs(z @ w_hat).max()))
        assert np.abs(z @ (w_hat - rounded)).max() > 1e-2  # 4-bit rounding error the two forms disagree by
  with pytest.raises(ValueError, match="shift_compensation"):
    HTGConfig(shift_compensation="none")


def test_uniform_calibrated_steps_and_their_nearest():
  calibrated = uniform_steps(100, 25)  # R1's 25 of 100: every 4.125 steps, both ends
  assert len(calibrated) == 25 and calibrated[0] == 0 and calibrated[-1] == 99
  np.testing.assert_array_equal(calibrated[:4], [0, 4, 8, 12])
  np.testing.assert_array_equal(uniform_steps(7, None), np.arange(7))
  for n_steps, n_calibrated in ((10, 4), (100, 25), (7, 7), (5, 1), (9, 2)):
    calibrated = uniform_steps(n_steps, n_calibrated)
    brute = [min(range(len(calibrated)), key=lambda j: (abs(calibrated[j] - i), calibrated[j])) for i in
             range(n_steps)]
    np.testing.assert_array_equal(nearest_calibrated(calibrated, n_steps), brute)
  with pytest.raises(ValueError, match="calib_timesteps"):
    uniform_steps(10, 11)
  with pytest.raises(ValueError, match="calib_timesteps"):
    PTQConfig(calib_timesteps=0)


def _step_tables(tree, path=()):
  """{path: leaf} of a quant collection, step tables as one leaf each."""
  if isinstance(tree, dict) and "group_of_step" not in tree:
    return {k: v for name, sub in tree.items() for k, v in _step_tables(sub, (*path, name)).items()}
  return {path: tree}


@pytest.mark.parametrize("proj_smoothing", ["fold_v", "explicit"])
def test_calibrating_some_steps_is_a_shorter_sampler_read_at_the_nearest_step(proj_smoothing):
  """Calibrating 4 of 10 steps (0, 3, 6, 9) gives the same kernels and tables as calibrating a 4-step sampler
  on those steps' stats, each of the 10 steps reading the table row of its nearest calibrated step (spec 3.2),
  so stats at the other steps are never read (corrupting them changes nothing)."""
  params, stats = _random_params(), _synthetic_stats(3, n_steps=10)
  nearest = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3])  # ties (none here at distance 1.5) would go to the noisier
  on_calibrated = {key: {e: v[[0, 3, 6, 9]] for e, v in layer.items()} for key, layer in stats.items()}
  corrupted = {key: {"min": layer["min"] - 100 * (np.arange(10) % 3 != 0)[:, None], "max": layer["max"]}
               for key, layer in stats.items()}
  for weight_bits, n_groups in ((4, 2), (8, None)):
    ptq = PTQConfig("htg", weight_bits=weight_bits, proj_smoothing=proj_smoothing, htg=HTGConfig(n_groups=n_groups))
    short_params, short_quant, _ = quantise_dit(CONFIG, params, on_calibrated, ptq)
    for every_stats in (stats, corrupted):
      qparams, quant, _ = quantise_dit(CONFIG, params, every_stats, dataclasses.replace(ptq, calib_timesteps=4))
      jax.tree.map(np.testing.assert_array_equal, qparams, short_params)
      short_tables, tables = _step_tables(short_quant), _step_tables(quant)
      assert tables.keys() == short_tables.keys()
      for path, short in short_tables.items():
        if isinstance(short, dict):
          np.testing.assert_array_equal(tables[path]["values"], short["values"])
          np.testing.assert_array_equal(tables[path]["group_of_step"], np.asarray(short["group_of_step"])[nearest])
        else:
          np.testing.assert_array_equal(tables[path], short)
  full = quantise_dit(CONFIG, params, stats, dataclasses.replace(ptq, calib_timesteps=10))
  jax.tree.map(np.testing.assert_array_equal, full[:2], quantise_dit(CONFIG, params, stats, ptq)[:2])


@pytest.mark.parametrize("method", ["naive", "htg"])
def test_quantise_all_linears_adds_the_other_linears_to_the_default(method):
  """`quantise_all_linears` = the default (block linears) plus, on every other linear, its weight quantiser
  applied to the kernel the default leaves in float (the adaLN kernels folded by HTG) and one activation range:
  the extremes of its input over all steps and channels. At W8 the real int8 path equals fake-quant there too."""
  params, (trajectory, timesteps, labels) = _random_params(), _calibration()
  stats = collect_input_stats(CONFIG, params, None, trajectory, timesteps, labels, 1.5)
  others = [k for k in quantised_layers(CONFIG, all_linears=True) if k not in quantised_layers(CONFIG)]
  assert set(others) == {("patch_embed",), ("t_embed_1",), ("t_embed_2",), ("final_adaLN",), ("final",),
                         ("block_0", "adaLN"), ("block_1", "adaLN")}
  for bits in (4, 8):
    ptq = PTQConfig(method, weight_bits=bits)
    default_params, default_quant, default_report = quantise_dit(CONFIG, params, stats, ptq)
    qparams, quant, report = quantise_dit(CONFIG, params, stats, dataclasses.replace(ptq, quantise_all_linears=True))
    for key in quantised_layers(CONFIG):
      jax.tree.map(np.testing.assert_array_equal, layer_entry(quant, key), layer_entry(default_quant, key))
      np.testing.assert_array_equal(layer_entry(qparams, key)["kernel"], layer_entry(default_params, key)["kernel"])
    for key in others:
      kept = layer_entry(default_params, key)["kernel"]
      np.testing.assert_array_equal(layer_entry(qparams, key)["kernel"],
                                    fake_quant_weight(kept, bits, per_channel=method != "naive"))
      assert (*key, "act_range") not in _step_tables(default_quant)
      act_range = layer_entry(quant, key)["act_range"]
      np.testing.assert_allclose(np.asarray(act_range["values"]),
                                 [[stats[key]["min"].min(), stats[key]["max"].max()]], rtol=1e-6)
    assert report["weight_bytes"] > default_report["weight_bytes"]
  model, (x, t, y) = DiT(CONFIG), _inputs(batch=4)
  fake = quantise_dit(CONFIG, params, stats, PTQConfig(method, quantise_all_linears=True))
  real = quantise_dit(CONFIG, params, stats, PTQConfig(method, quantise_all_linears=True, integer=True))
  assert real[1]["patch_embed"]["kernel_int8"].dtype == jnp.int8
  np.testing.assert_allclose(model.apply({"params": real[0], "quant": real[1]}, x, t, y, 2),
                             model.apply({"params": fake[0], "quant": fake[1]}, x, t, y, 2), atol=1e-4, rtol=1e-4)


def test_input_histograms_count_each_steps_values():
  """Against np.histogram of the intermediates read back from one model run per step, with bounds inside step 0's
  extremes so the end bins collect what lies beyond them."""
  from pangu.compress.quant.calibration import collect_input_histograms
  params, (trajectory, timesteps, labels) = _random_params(), _calibration(batch=3)
  stats = collect_input_stats(CONFIG, params, None, trajectory, timesteps, labels, 1.5)
  keys = [("patch_embed",), ("block_0", "qkv"), ("block_1", "fc2")]
  bounds = {key: (0.8 * float(stats[key]["min"][0].min()), 0.8 * float(stats[key]["max"][0].max())) for key in keys}
  histograms = collect_input_histograms(CONFIG, params, None, trajectory, timesteps, labels, 1.5, bounds, bins=64)
  model = DiT(CONFIG)
  both = jnp.concatenate([labels, jnp.full_like(labels, CONFIG.n_classes)])
  for step in (0, STEPS - 1):
    _, state = model.apply({"params": params}, jnp.concatenate([trajectory[step]] * 2),
                           jnp.full(both.shape, timesteps[step]), both, step, mutable=["intermediates"])
    for key in keys:
      values = np.asarray(layer_entry(state["intermediates"], key)["input"][0], np.float64).ravel()
      lo, hi = bounds[key]
      expected, _ = np.histogram(np.clip(values, lo, hi), bins=64, range=(lo, hi))
      assert histograms[key].shape == (STEPS, 64) and histograms[key][step].sum() == values.size
      assert step > 0 or (expected[0] > 0 and expected[-1] > 0)  # the end bins hold step 0's clipped tails
      # float32 binning may move a value on a bin edge to its neighbour, never further
      assert np.abs(np.cumsum(histograms[key][step]) - np.cumsum(expected)).max() <= 2


def _heavy_tailed(seed=0):
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.laplace(0.3, 1.0, size=200_000), [40.0, -25.0]])


def _histogram(values, bins=2048):
  bounds = (float(values.min()), float(values.max()))
  return np.histogram(values, bins=bins, range=bounds)[0], bounds


def _fake_quant_float64(x, lo, hi, bits=8):
  """An independent asymmetric grid covering [min(lo, 0), max(hi, 0)], in float64."""
  lo, hi = min(lo, 0.0), max(hi, 0.0)
  scale = (hi - lo) / (2 ** bits - 1)
  zero = np.round(-lo / scale) - 2 ** (bits - 1)
  return (np.clip(np.round(x / scale) + zero, -2 ** (bits - 1), 2 ** (bits - 1) - 1) - zero) * scale


def test_percentile_range_against_numpy():
  from pangu.compress.quant.ranges import bin_centres, percentile_range
  values = _heavy_tailed()
  counts, bounds = _histogram(values)
  width = (bounds[1] - bounds[0]) / len(counts)
  assert np.allclose(bin_centres(4, (0.0, 4.0)), [0.5, 1.5, 2.5, 3.5])
  for p in (99.0, 99.9, 99.99):
    lo, hi = percentile_range(counts, bounds, bounds, p)
    ref_lo, ref_hi = np.percentile(values, [100 - p, p])
    assert ref_lo - width <= lo <= ref_lo and ref_hi <= hi <= ref_hi + width  # rounded outwards to a bin edge
  assert percentile_range(counts, bounds, bounds, 100.0) == bounds
  assert percentile_range(counts, bounds, (-1.0, 2.0), 99.0) == (-1.0, 2.0)  # never beyond the extremes


def test_mse_range_minimises_the_quantisation_error_of_the_values():
  """Float64 brute force on the raw values over the same candidate ranges: the histogram's pick is within 2% of
  the best error and clips the outliers that the min-max range keeps."""
  from pangu.compress.quant.ranges import SHRINK_FACTORS, mse_range

  def error(values, lo, hi):
    return np.mean((_fake_quant_float64(values, lo, hi) - values) ** 2)

  values = _heavy_tailed(1)
  counts, bounds = _histogram(values)
  lo, hi = mse_range(counts, bounds, bounds, 8)
  errors = [error(values, bounds[0] * c, bounds[1] * c) for c in SHRINK_FACTORS]
  assert error(values, lo, hi) <= 1.02 * min(errors) < errors[0]
  assert bounds[0] < lo and hi < 0.8 * bounds[1]


def test_range_estimators_narrow_the_min_max_ranges_of_the_folded_model():
  """percentile / mse read histograms of the folded float model's inputs: every (layer, group) range lies inside
  its min-max range, some strictly; p = 100 is min-max itself."""
  from pangu.compress.quant.calibration import collect_input_histograms
  params, (trajectory, timesteps, labels) = _random_params(), _calibration()
  stats = collect_input_stats(CONFIG, params, None, trajectory, timesteps, labels, 1.5)

  def recollect(folded, quant, bounds):
    return collect_input_histograms(CONFIG, folded, quant, trajectory, timesteps, labels, 1.5, bounds)

  ptq = PTQConfig("htg", weight_bits=4, htg=HTGConfig(n_groups=2))
  _, minmax, _ = quantise_dit(CONFIG, params, stats, ptq)
  with pytest.raises(ValueError, match="recollect"):
    quantise_dit(CONFIG, params, stats, dataclasses.replace(ptq, act_range_estimator="mse"))
  for estimator, percentile in (("percentile", 100.0), ("percentile", 99.0), ("mse", 99.99)):
    _, quant, _ = quantise_dit(CONFIG, params, stats, dataclasses.replace(
        ptq, act_range_estimator=estimator, act_percentile=percentile), recollect)
    narrower = []
    for key in quantised_layers(CONFIG):
      (lo, hi), (mm_lo, mm_hi) = (np.asarray(layer_entry(q, key)["act_range"]["values"]).T for q in (quant, minmax))
      assert np.all(lo >= mm_lo - 1e-6) and np.all(hi <= mm_hi + 1e-6)
      narrower.append(np.any(hi < mm_hi - 1e-3) or np.any(lo > mm_lo + 1e-3))
    assert any(narrower) != (percentile == 100.0)
  for bad in ({"act_percentile": 50.0}, {"act_range_estimator": "kl"}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      PTQConfig(**bad)


def test_quant_attention_against_float64():
  """With ranges, q, k and v are fake-quantised (values beyond a range clipped), softmax(q k^T / sqrt(Dh)), the
  probabilities rounded to k / 255, then p v; without them it is the float attention."""
  from pangu.nn.quantized import QuantAttention, step_table
  q, k, v = (1.5 * jax.random.normal(key, (2, 8, 2, 4)) for key in jax.random.split(jax.random.key(3), 3))
  ranges = {"q": (-1.0, 1.5), "k": (-2.5, 2.0), "v": (-3.0, 3.0)}
  quant = {f"{name}_range": step_table(jnp.asarray([[0.0, 1.0], lo_hi], jnp.float32), [0, 1, 1])
           for name, lo_hi in ranges.items()}
  layer = QuantAttention(implementation="xla")
  out = layer.apply({"quant": quant}, q, k, v, 2)
  qq, kk, vv = (_fake_quant_float64(np.asarray(x, np.float64), *ranges[name]) for name, x in zip("qkv", (q, k, v)))
  logits = np.einsum("bqhd,bkhd->bhqk", qq, kk) / 2.0
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = np.round(p / p.sum(-1, keepdims=True) * 255) / 255
  np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", p, vv), atol=1e-5)
  assert np.abs(np.asarray(q)).max() > 1.5  # some of q was clipped
  float_out = np.asarray(layer.apply({}, q, k, v, 2))
  logits = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64)) / 2.0
  p = np.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(float_out, np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v), atol=1e-5)
  with pytest.raises(ValueError, match="step"):
    layer.apply({"quant": quant}, q, k, v)


@pytest.mark.parametrize("proj_smoothing", ["fold_v", "explicit"])
def test_attention_ranges_are_the_folded_models_operand_extremes(proj_smoothing):
  """q, k and v ranges per group equal the extremes of the folded float model's operands, re-collected by running
  it (under fold_v, v carries proj's shift and scale and takes proj's groups; q and k take qkv's)."""
  params, (trajectory, timesteps, labels) = _random_params(), _calibration()
  stats = collect_input_stats(CONFIG, params, None, trajectory, timesteps, labels, 1.5)
  ptq = PTQConfig("htg", proj_smoothing=proj_smoothing, quantise_attention=True, htg=HTGConfig(n_groups=2))
  qparams, quant, report = quantise_dit(CONFIG, params, stats, ptq)
  folded, folded_quant = reparameterise(CONFIG, params, report["plans"], STEPS, proj_smoothing)
  rerun = collect_input_stats(CONFIG, folded, folded_quant, trajectory, timesteps, labels, 1.5)
  for block, _, name in attention_operands(CONFIG):
    source = "proj" if name == "v" and proj_smoothing == "fold_v" else "qkv"
    groups = report["plans"][(block, source)].group_of_step
    table = quant[block]["attention"][f"{name}_range"]
    np.testing.assert_array_equal(table["group_of_step"], groups)
    operand = rerun[(block, "attention", name)]
    for g in range(2):
      expected = [operand["min"][groups == g].min(), operand["max"][groups == g].max()]
      np.testing.assert_allclose(table["values"][g], expected, rtol=1e-4, atol=1e-4)
  moved = [not np.allclose(rerun[key]["max"], stats[key]["max"], rtol=1e-3) for key in attention_operands(CONFIG)]
  assert any(moved) == (proj_smoothing == "fold_v")  # only v under fold_v differs from the float model's
  model, (x, t, y) = DiT(CONFIG), _inputs(batch=4)
  without = quantise_dit(CONFIG, params, stats, dataclasses.replace(ptq, quantise_attention=False))
  outputs = [np.asarray(model.apply({"params": p, "quant": q}, x, t, y, 2)) for p, q in ((qparams, quant), without[:2])]
  reference = np.asarray(model.apply({"params": params}, x, t, y, 2))
  errors = [np.linalg.norm(out - reference) / np.linalg.norm(reference) for out in outputs]
  assert errors[1] < errors[0] < 0.25


@pytest.mark.parametrize("method, grid", [("htg", "htg"), ("smoothquant", "migration"), ("htg", "migration")])
def test_select_ptq_halves_to_the_candidate_with_the_lowest_calibration_score(method, grid):
  """The score here is the quantised model's output error against float on the first `budget` held-out inputs,
  computed independently for each candidate. One budget: the selection is the argmin over all. Two: every
  candidate of the 8 is scored on 1 input, the best quarter on all 4, and the pick is their argmin."""
  from pangu.compress.quant.select import htg_candidates, migration_candidates, select_ptq
  params, stats = _random_params(), _synthetic_stats(1)
  model, (x, t, y) = DiT(CONFIG), _inputs(batch=4, seed=5)
  apply = jax.jit(lambda variables: model.apply(variables, x, t, y, 3))
  reference = np.asarray(apply({"params": params}))

  def score(qparams, quant, budget):
    return float(np.mean((np.asarray(apply({"params": qparams, "quant": quant})) - reference)[:budget] ** 2))

  ptq = PTQConfig(method, weight_bits=4)
  if grid == "htg":
    candidates = htg_candidates(ptq, alphas=(0.0, 0.99))
    settings = [(c.htg.alpha, "fc2" in c.htg.scaled_layers, c.htg.shift_compensation) for c in candidates]
    assert settings == list(itertools.product((0.0, 0.99), (True, False), ("quantised", "float")))
  else:
    candidates = migration_candidates(ptq, migrations=(0.3, 0.4, 0.6, 0.7))
    varied = [getattr(c, method) for c in candidates]
    settings = [(v.migration, "fc2" in v.scaled_layers) for v in varied]
    assert settings == list(itertools.product((0.3, 0.4, 0.6, 0.7), (True, False)))
  assert all(dataclasses.replace(c, htg=ptq.htg, smoothquant=ptq.smoothquant) == ptq for c in candidates)
  quantised = [quantise_dit(CONFIG, params, stats, c)[:2] for c in candidates]
  on_one, on_all = (np.array([score(*q, budget) for q in quantised]) for budget in (1, 4))
  assert len(set(np.round(on_all, 12))) > 1

  chosen, scores = select_ptq(CONFIG, params, stats, candidates, score, budgets=(4,))
  np.testing.assert_allclose([s[4] for s in scores], on_all, rtol=1e-6)
  assert chosen == candidates[int(np.argmin(on_all))]

  chosen, scores = select_ptq(CONFIG, params, stats, candidates, score, budgets=(1, 4), reduction=4)
  survivors = sorted(np.argsort(on_one, kind="stable")[:2])
  np.testing.assert_allclose([s[1] for s in scores], on_one, rtol=1e-6)
  assert [i for i, s in enumerate(scores) if 4 in s] == survivors
  np.testing.assert_allclose([scores[i][4] for i in survivors], on_all[survivors], rtol=1e-6)
  assert chosen == candidates[survivors[int(np.argmin(on_all[survivors]))]]
  for budgets, reduction in (((4, 1), 4), ((0, 4), 4), ((), 4), ((1, 4), 1)):
    with pytest.raises(ValueError, match="budgets" if reduction > 1 else "reduction"):
      select_ptq(CONFIG, params, stats, candidates, score, budgets=budgets, reduction=reduction)
  with pytest.raises(ValueError, match="candidate"):
    select_ptq(CONFIG, params, stats, [], score, budgets=(4,))
  with pytest.raises(ValueError, match="method is 'naive'"):
    (htg_candidates if grid == "htg" else migration_candidates)(PTQConfig("naive"))
  if grid == "migration" and method == "htg":
    with pytest.raises(ValueError, match="HTGConfig.migration 0.3 applies to the sqrt_weight split only"):
      migration_candidates(PTQConfig("htg", htg=HTGConfig(scale="normalised")))
