"""Calibration capture: per sampler step, the per-channel min and max of every quantised linear's input.

The inputs come from `QuantDense`'s `sow("intermediates", "input", ...)`: the tensor the activation quantiser
sees, so the same capture serves the first pass (raw inputs, for shifts and scales) and the second (smoothed
inputs of the re-parameterised float model, for activation ranges). Trajectories come from the float sampler
(pangu.diffusion.samplers returns them); with guidance the batch is doubled with null labels, as the sampler
runs it.
"""

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
  model, layers = DiT(config), quantised_layers(config)
  variables = {"params": params} | ({"quant": quant} if quant else {})
  if guidance != 1.0:
    labels = jnp.concatenate([labels, jnp.full_like(labels, config.n_classes)])

  @jax.jit
  def step_stats(x, tau, step):
    if guidance != 1.0:
      x = jnp.concatenate([x, x])
    _, state = model.apply(variables, x, jnp.full(labels.shape, tau), labels, step, mutable=["intermediates"])
    out = {}
    for block, name in layers:
      (inputs,) = state["intermediates"][block][name]["input"]
      flat = inputs.reshape(-1, inputs.shape[-1])
      out[(block, name)] = (flat.min(0), flat.max(0))
    return out

  per_step = [step_stats(trajectory[i], int(timesteps[i]), i) for i in range(len(timesteps))]
  return {key: {"min": np.stack([np.asarray(s[key][0]) for s in per_step]),
                "max": np.stack([np.asarray(s[key][1]) for s in per_step])} for key in layers}
