"""DDIM (Song et al. 2021) and DDPM ancestral sampling with classifier-free guidance (Ho & Salimans 2022).

A sampler runs `n_steps` steps i = 0..n_steps-1 over the training timesteps tau_i, from the noisiest
(i = 0, tau_0 = T - 1) to the cleanest (tau = 0). The denoiser receives the step index i besides the diffusion
time, because a timestep-aware quantised model keys its tables by the sampler step (spec pitfall: both CFG halves
share it). Everything is a pure function of the rng, so a seed fixes the samples.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pangu.diffusion.schedules import ScheduleConfig, alpha_bars

# eps(x [B, ...], timesteps int [B], labels int [B], step index) -> predicted noise [B, ...].
Denoiser = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def sampling_timesteps(n_timesteps: int, n_steps: int) -> np.ndarray:
  """tau_0 > tau_1 > ... > tau_{n-1} = 0: n_steps timesteps spread evenly over 0..T-1, noisiest first."""
  if not 1 <= n_steps <= n_timesteps:
    raise ValueError(f"n_steps must be in [1, {n_timesteps}], got {n_steps}")
  return np.round(np.linspace(n_timesteps - 1, 0, n_steps)).astype(np.int32)


def guided(denoiser: Denoiser, null_label: int, guidance: float) -> Denoiser:
  """Classifier-free guidance: eps_null + w (eps_cond - eps_null) from one doubled batch; w = 1 is plain
  conditional sampling (and runs the batch once)."""
  if guidance == 1.0:
    return denoiser

  def eps(x, t, labels, step):
    both = denoiser(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    jnp.concatenate([labels, jnp.full_like(labels, null_label)]), step)
    cond, uncond = jnp.split(both, 2)
    return uncond + guidance * (cond - uncond)

  return eps


def per_step_noise_mse(denoiser: Denoiser, reference: Denoiser, trajectory: jax.Array, timesteps: np.ndarray,
                       labels: jax.Array) -> jax.Array:
  """[S]: the mean squared difference of two denoisers' noise predictions at each step of one trajectory
  [S, B, ...] (e.g. the reference's own sampler inputs, timesteps [S] its tau_i). Both see the same inputs at
  every step, so a step's error is that step's alone, not the drift earlier steps' errors leave in a sample."""
  if trajectory.shape[0] != len(timesteps):
    raise ValueError(f"trajectory has {trajectory.shape[0]} steps but {len(timesteps)} timesteps were given")

  def step_error(args):
    x, tau, step = args
    t = jnp.full(labels.shape, tau)
    return jnp.mean(jnp.square(denoiser(x, t, labels, step) - reference(x, t, labels, step)))

  return jax.lax.map(step_error, (trajectory, jnp.asarray(timesteps), jnp.arange(trajectory.shape[0])))


def ddim_sample(denoiser: Denoiser, schedule: ScheduleConfig, labels: jax.Array, shape: tuple[int, ...],
                rng: jax.Array, n_steps: int, *, eta: float = 0.0, clip: bool = True,
                batch_size: int | None = None, noise: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Samples [B, *shape] for labels [B]; also returns the trajectory [n_steps, B, *shape] of each step's input.

  eta = 0 is deterministic DDIM; eta = 1 is DDPM's ancestral sampler on the chosen timesteps (Song et al. 2021,
  Eq. 16). clip: clip the predicted x_0 to the data range [-1, 1].
  batch_size: rows denoised together (None: all B). Chunks of this many rows run through every step one after
  another from the same noise, so they give the one batch's samples; on CPU a chunk whose activations stay in
  cache runs faster (the quantised-DiT experiment's full model shape, random weights, 1000 samples with
  guidance: 1.15 s a step in one batch, 0.54 s in chunks of 125 on a 2-core AMD EPYC).
  noise: the start x_T [B, *shape] (None: drawn from rng). With eta = 0 a row's sample depends on its own noise
  and label only, so the first n rows of the noise and labels give the first n samples: a calibration split can
  be scored on part of its trajectories.
  """
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"batch_size must be positive or None, got {batch_size}")
  if noise is not None and noise.shape != (labels.shape[0], *shape):
    raise ValueError(f"noise has shape {noise.shape}, expected {(labels.shape[0], *shape)} for "
                     f"{labels.shape[0]} labels")
  bars = alpha_bars(schedule)
  taus = jnp.asarray(sampling_timesteps(schedule.n_timesteps, n_steps))
  next_bars = jnp.concatenate([bars[taus[1:]], jnp.ones((1,))])
  batch = labels.shape[0]
  x = initial_noise(rng, batch, shape) if noise is None else noise
  step_rng = jax.random.split(rng)[1]
  keys = jax.random.split(step_rng, n_steps)

  def run(x, labels, offset):
    """The sampler on rows offset.. of the batch (their slice of each step's noise)."""
    def step(x, inputs):
      i, tau, a_next, key = inputs
      a = bars[tau]
      eps = denoiser(x, jnp.full(labels.shape, tau), labels, i)
      x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
      if clip:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
      sigma = eta * jnp.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
      x_next = jnp.sqrt(a_next) * x0 + jnp.sqrt(jnp.maximum(1 - a_next - sigma ** 2, 0.0)) * eps
      if eta:
        noise = jax.random.normal(key, (batch, *shape))
        x_next = x_next + sigma * jax.lax.dynamic_slice_in_dim(noise, offset, x.shape[0])
      return x_next, x

    return jax.lax.scan(step, x, (jnp.arange(n_steps), taus, next_bars, keys))

  chunk = batch if batch_size is None else min(batch_size, batch)
  n_chunks, head = batch // chunk, batch // chunk * chunk
  if n_chunks == 1:
    result = run(x[:head], labels[:head], 0)
  else:
    samples, trajectory = jax.lax.map(lambda args: run(*args), (
        x[:head].reshape(n_chunks, chunk, *shape), labels[:head].reshape(n_chunks, chunk),
        jnp.arange(n_chunks) * chunk))
    result = samples.reshape(head, *shape), jnp.moveaxis(trajectory, 0, 1).reshape(n_steps, head, *shape)
  return result if head == batch else _concat(result, run(x[head:], labels[head:], head))


def initial_noise(rng: jax.Array, batch: int, shape: tuple[int, ...]) -> jax.Array:
  """x_T [batch, *shape] as `ddim_sample` draws it from rng when it is given no noise."""
  return jax.random.normal(jax.random.split(rng)[0], (batch, *shape))


def sample_in_chunks(sample_fn: Callable[[jax.Array, jax.Array], jax.Array], labels: jax.Array, noise: jax.Array,
                     chunk: int, devices: Sequence[jax.Device] | None = None) -> np.ndarray:
  """sample_fn(labels [chunk], noise [chunk, ...]) -> samples [chunk, ...] (e.g. a jitted deterministic DDIM),
  called from the host on `chunk` rows at a time, the last chunk padded; returns the samples [B, ...] of labels
  [B] and noise [B, ...].

  One compiled sample_fn then serves every row count, where a jitted sampler over all B rows compiles again for
  each B. Valid where a row's sample depends on its own noise and label alone (DDIM with eta = 0).

  With `devices`, chunk k's rows are committed to devices[k % len(devices)], so that dispatch runs chunks on
  several devices at once (XLA:CPU host devices share the cores: a small model's chunk alone keeps two cores
  busy only part of the time). Each device runs the same program on the same rows, so the samples are the same
  bits as on one device; arrays sample_fn closes over must be uncommitted (e.g. NumPy) to follow its inputs.
  """
  if chunk < 1:
    raise ValueError(f"chunk must be positive, got {chunk}")
  if noise.shape[0] != labels.shape[0] or not labels.shape[0]:
    raise ValueError(f"noise has {noise.shape[0]} rows but {labels.shape[0]} labels were given (at least one)")
  if devices is not None and not devices:
    raise ValueError("devices is empty: give at least one device, or None for the default placement")
  parts = []
  for index, start in enumerate(range(0, labels.shape[0], chunk)):
    rows = min(chunk, labels.shape[0] - start)
    pad = [(0, chunk - rows)]
    inputs = (jnp.pad(labels[start:start + rows], pad),
              jnp.pad(noise[start:start + rows], pad + [(0, 0)] * (noise.ndim - 1)))
    if devices is not None:
      inputs = jax.device_put(inputs, devices[index % len(devices)])
    parts.append(sample_fn(*inputs)[:rows])
  return np.concatenate([np.asarray(part) for part in parts])


def _concat(first: tuple[jax.Array, jax.Array], rest: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(samples, trajectory) of two consecutive row ranges, joined."""
  return jnp.concatenate([first[0], rest[0]]), jnp.concatenate([first[1], rest[1]], axis=1)


def ddpm_sample(denoiser: Denoiser, schedule: ScheduleConfig, labels: jax.Array, shape: tuple[int, ...],
                rng: jax.Array, n_steps: int) -> tuple[jax.Array, jax.Array]:
  """DDPM ancestral sampling (DDIM with eta = 1); n_steps = T is the original sampler."""
  return ddim_sample(denoiser, schedule, labels, shape, rng, n_steps, eta=1.0)
