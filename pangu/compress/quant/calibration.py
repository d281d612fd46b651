"""Calibration capture: per sampler step, the per-channel min and max of every quantised linear's input.

The inputs come from `QuantDense`'s `sow("intermediates", "input", ...)`: the tensor the activation quantiser
sees: the raw inputs of the float model (for shifts, scales and, mapped through them, activation ranges:
`ptq.smoothed_stats`) or the smoothed inputs of a re-parameterised one. Trajectories come from the float
sampler (pangu.diffusion.samplers returns them); with guidance the batch is doubled with null labels, as the
sampler runs it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pangu.models.dit import BLOCK_LINEARS, DiT, DiTConfig

LayerKey = tuple[str, str]  # (block name, linear name), e.g. ("block_0", "qkv")
Stats = dict[LayerKey, dict[str, np.ndarray]]  # layer -> {"min": [S, C], "max": [S, C]}


def quantised_layers(config: DiTConfig) -> list[LayerKey]:
  return [(f"block_{i}", name) for i in range(config.depth) for name in BLOCK_LINEARS]


def collect_input_stats(config: DiTConfig, params: dict, quant: dict | None, trajectory: jax.Array,
                        timesteps: np.ndarray, labels: jax.Array, guidance: float) -> Stats:
  """trajectory [S, B, H, W, C] (the sampler's step inputs), timesteps [S] -> per-step channel min / max."""
  if trajectory.shape[0] != len(timesteps):
    raise ValueError(f"trajectory has {trajectory.shape[0]} steps but {len(timesteps)} timesteps were given")
  variables = {"params": params} | ({"quant": quant} if quant else {})
  return jax.tree.map(np.asarray, _stats(config, guidance, variables, trajectory, jnp.asarray(timesteps), labels))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _stats(config: DiTConfig, guidance: float, variables: dict, trajectory: jax.Array, timesteps: jax.Array,
           labels: jax.Array) -> Stats:
  """Every step in one compiled loop (the model's weights are arguments, not constants)."""
  model = DiT(config)
  if guidance != 1.0:
    labels = jnp.concatenate([labels, jnp.full_like(labels, config.n_classes)])

  def step_stats(args):
    x, tau, step = args
    if guidance != 1.0:
      x = jnp.concatenate([x, x])
    _, state = model.apply(variables, x, jnp.full(labels.shape, tau), labels, step, mutable=["intermediates"])
    out = {}
    for block, name in quantised_layers(config):
      (inputs,) = state["intermediates"][block][name]["input"]
      flat = inputs.reshape(-1, inputs.shape[-1])
      out[(block, name)] = {"min": flat.min(0), "max": flat.max(0)}
    return out

  return jax.lax.map(step_stats, (trajectory, timesteps, jnp.arange(trajectory.shape[0])))
