"""DiT shapes and counts, the schedule, DDIM / DDPM samplers and the FID-digits metric against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from pangu.diffusion.digits import load_digits_images
from pangu.diffusion.fid import frechet_distance, paired_fid_gap
from pangu.diffusion.objective import ddpm_loss
from pangu.diffusion.samplers import (ddim_sample, ddpm_sample, guided, initial_noise, per_step_noise_mse,
                                     sample_in_chunks, sampling_timesteps)
from pangu.diffusion.schedules import ScheduleConfig, alpha_bars
from pangu.models.dit import DiT, DiTConfig, dit_param_count, dit_preset, init_dit, patchify, unpatchify

TINY = DiTConfig(d_model=32, depth=2, n_heads=2)


def test_param_count_matches_params_and_published_xl():
  params = init_dit(TINY, jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(params)) == dit_param_count(TINY)
  # DiT-XL/2: 675M parameters (Peebles & Xie, Table 4); ours adds a learned position table (0.3M).
  assert abs(dit_param_count(dit_preset("DiT-XL/2")) / 675e6 - 1) < 0.01


def test_patchify_round_trip_and_token_order():
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  tokens = patchify(images, 2)
  assert tokens.shape == (2, 16, 12)
  np.testing.assert_array_equal(tokens[0, 1].reshape(2, 2, 3), images[0, 0:2, 2:4])
  np.testing.assert_array_equal(unpatchify(tokens, 2, 8, 3), images)


def test_adaln_zero_init_predicts_zero():
  params = init_dit(TINY, jax.random.key(0))
  out = DiT(TINY).apply({"params": params}, jnp.ones((3, 8, 8, 1)), jnp.array([0, 5, 9]), jnp.array([1, 2, 10]))
  np.testing.assert_array_equal(out, np.zeros((3, 8, 8, 1)))


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="patch_size"):
    DiTConfig(image_size=8, patch_size=3)
  with pytest.raises(ValueError, match="n_heads"):
    DiTConfig(d_model=30, n_heads=4)


def test_linear_schedule_matches_float64():
  bars = alpha_bars(ScheduleConfig(n_timesteps=50))
  expected = np.cumprod(1 - np.linspace(1e-4, 0.02, 50))
  np.testing.assert_allclose(bars, expected, rtol=1e-6)
  assert sampling_timesteps(1000, 5).tolist() == [999, 749, 500, 250, 0]


def _oracle(target, schedule):
  """The exact noise predictor when all data is one image: eps = (x - sqrt(a) x0) / sqrt(1 - a)."""
  bars = alpha_bars(schedule)

  def eps(x, t, labels, step):
    a = bars[t][:, None, None, None]
    return (x - jnp.sqrt(a) * target) / jnp.sqrt(1 - a)
  return eps


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_recovers_the_single_data_point(eta):
  schedule = ScheduleConfig(n_timesteps=100)
  target = jnp.linspace(-0.9, 0.9, 64).reshape(1, 8, 8, 1)
  samples, trajectory = ddim_sample(_oracle(target, schedule), schedule, jnp.zeros((4,), jnp.int32), (8, 8, 1),
                                    jax.random.key(0), 10, eta=eta)
  np.testing.assert_allclose(samples, np.broadcast_to(target, samples.shape), atol=1e-4)
  assert trajectory.shape == (10, 4, 8, 8, 1)


def test_sampler_step_index_and_timestep_stay_aligned():
  """Quantisation tables are read at the sampler's step index i and calibration pairs trajectory[i] with tau_i.
  A denoiser predicting zero noise only when it receives (tau_i, i) together leaves DDIM's closed form
  x_{i+1} = sqrt(abar(tau_{i+1}) / abar(tau_i)) x_i; any off-by-one between i and tau_i moves it far off."""
  schedule, steps = ScheduleConfig(), 7
  taus = sampling_timesteps(schedule.n_timesteps, steps)

  def denoiser(x, t, labels, i):
    return jnp.zeros_like(x) + (t - jnp.asarray(taus)[i]).astype(x.dtype)[:, None, None, None]

  samples, trajectory = ddim_sample(guided(denoiser, 10, 1.5), schedule, jnp.arange(2), (4, 4, 1),
                                    jax.random.key(0), steps, clip=False)
  bars = np.asarray(alpha_bars(schedule), np.float64)
  start = np.asarray(trajectory[0], np.float64)
  np.testing.assert_allclose(trajectory, [start * np.sqrt(bars[tau] / bars[taus[0]]) for tau in taus], rtol=1e-4)
  np.testing.assert_allclose(samples, start / np.sqrt(bars[taus[0]]), rtol=1e-4)


def test_sampler_deterministic_given_seed():
  config = DiTConfig(d_model=16, depth=1, n_heads=2)
  params = init_dit(config, jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  model = DiT(config)
  denoiser = guided(lambda x, t, y, i: model.apply({"params": params}, x, t, y, i), config.n_classes, 1.5)
  labels = jnp.arange(4)
  run = jax.jit(lambda key: ddpm_sample(denoiser, ScheduleConfig(), labels, (8, 8, 1), key, 5)[0])
  first, second, other = run(jax.random.key(7)), run(jax.random.key(7)), run(jax.random.key(8))
  np.testing.assert_array_equal(first, second)
  assert np.abs(np.asarray(first) - np.asarray(other)).max() > 1e-3


def _guided_denoiser():
  """A small DiT with non-zero weights (the zero-init output layer would predict 0 everywhere) under guidance,
  ten labels and a sampling key."""
  config = DiTConfig(d_model=16, depth=2, n_heads=2)
  params = init_dit(config, jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  model = DiT(config)
  denoiser = guided(lambda x, t, y, i: model.apply({"params": params}, x, t, y, i), config.n_classes, 1.5)
  return denoiser, jnp.arange(10) % config.n_classes, jax.random.key(3)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("batch_size", [4, 5, 6, 10, 64])  # chunks with a tail, without, one chunk + tail, all
def test_sampler_in_chunks_gives_the_one_batch_samples(eta, batch_size):
  denoiser, labels, key = _guided_denoiser()
  want = jax.jit(lambda: ddim_sample(denoiser, ScheduleConfig(), labels, (8, 8, 1), key, 6, eta=eta))()
  got = jax.jit(lambda: ddim_sample(denoiser, ScheduleConfig(), labels, (8, 8, 1), key, 6, eta=eta,
                                    batch_size=batch_size))()
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="batch_size"):
    ddim_sample(denoiser, ScheduleConfig(), labels, (8, 8, 1), key, 6, batch_size=0)


def test_sampler_from_given_noise_and_a_prefix_of_its_rows():
  """x_T passed in gives the samples of the noise the sampler would draw; with eta = 0 rows are independent, so
  the first rows of the noise and labels alone give the first rows' samples (what scoring part of a calibration
  split relies on)."""
  denoiser, labels, key = _guided_denoiser()
  sample = jax.jit(lambda labels, noise: ddim_sample(denoiser, ScheduleConfig(), labels, (8, 8, 1), key, 6,
                                                     batch_size=4, noise=noise))
  samples, trajectory = sample(labels, None)
  again, again_trajectory = sample(labels, trajectory[0])
  np.testing.assert_allclose(again, samples, rtol=1e-5, atol=1e-6)  # two compilations: fusion order differs
  np.testing.assert_allclose(again_trajectory, trajectory, rtol=1e-5, atol=1e-6)
  prefix, _ = sample(labels[:3], trajectory[0, :3])
  np.testing.assert_allclose(prefix, samples[:3], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(sample(labels, -trajectory[0])[0]) - np.asarray(samples)).max() > 0.1  # noise is used
  with pytest.raises(ValueError, match="noise has shape"):
    ddim_sample(denoiser, ScheduleConfig(), labels, (8, 8, 1), key, 6, noise=trajectory[0, :3])


@pytest.mark.parametrize("chunk", [3, 4, 10, 16])  # a tail, none, one chunk, one padded chunk
def test_host_chunks_give_the_one_batch_samples(chunk):
  """Chunks from the host (the last padded) give the samples of one batch from the noise the sampler draws."""
  denoiser, labels, key = _guided_denoiser()
  samples, _ = jax.jit(lambda: ddim_sample(denoiser, ScheduleConfig(), labels, (8, 8, 1), key, 6))()
  chunk_fn = jax.jit(lambda y, x: ddim_sample(denoiser, ScheduleConfig(), y, (8, 8, 1), key, 6, noise=x)[0])
  got = sample_in_chunks(chunk_fn, labels, initial_noise(key, labels.shape[0], (8, 8, 1)), chunk)
  assert got.shape == samples.shape
  np.testing.assert_allclose(got, samples, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="noise has 3 rows but 10 labels"):
    sample_in_chunks(chunk_fn, labels, jnp.zeros((3, 8, 8, 1)), chunk)


def test_host_chunks_spread_over_devices_give_the_same_bits():
  """Chunks committed round-robin to several devices run there and give one device's samples bit for bit."""
  denoiser, labels, key = _guided_denoiser()
  chunk_fn = jax.jit(lambda y, x: ddim_sample(denoiser, ScheduleConfig(), y, (8, 8, 1), key, 6, noise=x)[0])
  ran_on = []

  def recording_fn(y, x):
    ran_on.append(next(iter(x.devices())))
    return chunk_fn(y, x)

  noise, devices = initial_noise(key, labels.shape[0], (8, 8, 1)), jax.devices()[:2]
  one = sample_in_chunks(chunk_fn, labels, noise, 4)
  spread = sample_in_chunks(recording_fn, labels, noise, 4, devices=devices)
  np.testing.assert_array_equal(spread, one)
  assert ran_on == [devices[0], devices[1], devices[0]]
  with pytest.raises(ValueError, match="devices is empty"):
    sample_in_chunks(chunk_fn, labels, noise, 4, devices=[])


def test_per_step_noise_mse_against_float64():
  """Each step's error is read at that step's inputs, diffusion time and index (float64 closed form)."""
  trajectory = jax.random.normal(jax.random.key(0), (5, 3, 4, 4, 1))
  timesteps, labels = np.array([900, 700, 400, 100, 0]), jnp.array([1, 2, 3])

  def denoiser(x, t, y, step):
    return x * (1.0 + step) + 1e-3 * t[:, None, None, None] + y[:, None, None, None]

  def reference(x, t, y, step):
    return x + y[:, None, None, None]

  x = np.asarray(trajectory, np.float64)
  expected = [np.mean((x[i] * i + 1e-3 * timesteps[i]) ** 2) for i in range(5)]
  np.testing.assert_allclose(per_step_noise_mse(denoiser, reference, trajectory, timesteps, labels), expected,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="timesteps"):
    per_step_noise_mse(denoiser, reference, trajectory, timesteps[1:], labels)


def test_guidance_combines_conditional_and_null():
  calls = []

  def denoiser(x, t, labels, step):
    calls.append(labels)
    return jnp.where(labels[:, None] == 10, 1.0, 3.0) * jnp.ones((x.shape[0], 2))
  out = guided(denoiser, 10, 1.5)(jnp.zeros((2, 2)), jnp.zeros(2, jnp.int32), jnp.array([4, 5]), 0)
  np.testing.assert_allclose(out, 1.0 + 1.5 * (3.0 - 1.0))
  assert calls[0].tolist() == [4, 5, 10, 10]


@pytest.mark.slow
def test_ddpm_loss_of_the_zero_model_is_the_noise_variance():
  params = init_dit(TINY, jax.random.key(0))
  images, labels = load_digits_images()
  loss, _ = ddpm_loss(TINY, ScheduleConfig())(params, {"images": jnp.asarray(images[:256]),
                                                       "labels": jnp.asarray(labels[:256])}, jax.random.key(1))
  assert abs(float(loss) - 1.0) < 0.05  # E[eps^2] = 1 for a model that predicts 0
  assert images.min() == -1.0 and images.max() == 1.0


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(500, 4))
  assert abs(frechet_distance(a, a)) < 1e-6
  shift = np.array([1.0, -2.0, 0.5, 0.0])
  assert abs(frechet_distance(a, a + shift) - np.sum(shift ** 2)) < 1e-6
  # Doubling: ||mu||^2 + tr(S + 4 S - 2 (4 S^2)^(1/2)) = ||mu||^2 + tr(S).
  expected = np.sum(a.mean(0) ** 2) + np.trace(np.cov(a, rowvar=False))
  assert abs(frechet_distance(a, 2 * a) - expected) < 1e-6


def test_frechet_distance_matches_the_general_matrix_square_root():
  # Non-commuting covariances of 64 features: the eigenvalue route against FID's usual sqrtm of S_a S_b.
  rng = np.random.default_rng(0)
  a = rng.normal(size=(700, 64)) @ rng.normal(size=(64, 64))
  b = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64)) + 0.5
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b)
              - 2 * np.trace(np.real(scipy.linalg.sqrtm(cov_a @ cov_b))))
  assert abs(frechet_distance(a, b) - expected) < 1e-8 * expected


def test_paired_fid_gap_resamples_as_gathered_rows_would():
  # The batched weighted moments against each resample's gathered rows and the general square root, on the same
  # draws (one rng.integers(0, n, n) per resample, in order).
  rng = np.random.default_rng(3)
  a, reference = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)), rng.normal(size=(400, 8)) + 0.2
  b = a + 0.3 * rng.normal(size=a.shape)

  def sqrtm_fid(x):
    cov_x, cov_r = np.cov(x, rowvar=False), np.cov(reference, rowvar=False)
    return (np.sum((x.mean(0) - reference.mean(0)) ** 2) + np.trace(cov_x + cov_r)
            - 2 * np.trace(np.real(scipy.linalg.sqrtm(cov_x @ cov_r))))

  draws = np.random.default_rng(7)
  gaps = []
  for _ in range(50):
    rows = draws.integers(0, len(a), len(a))
    gaps.append(sqrtm_fid(a[rows]) - sqrtm_fid(b[rows]))
  out = paired_fid_gap(a, b, reference, resamples=50, seed=7)
  np.testing.assert_allclose([out["low"], out["high"]], np.quantile(gaps, [0.025, 0.975]), rtol=1e-8)
  assert abs(out["gap"] - (sqrtm_fid(a) - sqrtm_fid(b))) < 1e-8


def test_paired_fid_gap_against_the_closed_form_of_a_shift():
  # a = b + s shares b's covariance, so per resample FID(a) - FID(b) = |s|^2 + 2 s.(mean_b - mean_ref): the
  # interval is the gap +- z * 2 sqrt(s' S s / n), far narrower than either FID's own spread.
  rng = np.random.default_rng(0)
  b, reference = rng.normal(size=(1000, 4)), rng.normal(size=(800, 4)) + 0.1
  shift = np.array([0.3, -0.2, 0.1, 0.0])
  out = paired_fid_gap(b + shift, b, reference, resamples=2000, seed=1)
  assert abs(out["gap"] - (shift @ shift + 2 * shift @ (b.mean(0) - reference.mean(0)))) < 1e-6
  half_width = 1.96 * 2 * np.sqrt(shift @ np.cov(b, rowvar=False) @ shift / len(b))
  assert out["low"] < out["gap"] < out["high"]
  assert abs((out["high"] - out["low"]) / 2 - half_width) < 0.15 * half_width
  assert paired_fid_gap(b, b, reference, resamples=20) == {"gap": 0.0, "low": 0.0, "high": 0.0}
  with pytest.raises(ValueError, match="paired feature rows"):
    paired_fid_gap(b, b[:10], reference)
