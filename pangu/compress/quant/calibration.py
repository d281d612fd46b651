"""Calibration capture: per sampler step, the per-channel min and max of every quantised linear's input.

The inputs come from `QuantDense`'s `sow("intermediates", "input", ...)`: the tensor the activation quantiser
sees: the raw inputs of the float model (for shifts, scales and, mapped through them, activation ranges:
`ptq.smoothed_stats`) or the smoothed inputs of a re-parameterised one. Trajectories come from the float
sampler (pangu.diffusion.samplers returns them); with guidance the batch is doubled with null labels, as the
sampler runs it. Every linear's stats are collected (a min and a max per step and channel are cheap), so one
capture serves the block linears alone (spec 3.1's default) and `PTQConfig.quantise_all_linears`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pangu.models.dit import BLOCK_LINEARS, OUTER_LINEARS, DiT, DiTConfig

# A linear's path in the DiT's module tree: (block name, linear name), e.g. ("block_0", "qkv"), or (linear name,)
# for the embedders and the final layer, e.g. ("patch_embed",).
LayerKey = tuple[str, ...]
Stats = dict[LayerKey, dict[str, np.ndarray]]  # layer -> {"min": [S, C], "max": [S, C]}


def quantised_layers(config: DiTConfig, all_linears: bool = False) -> list[LayerKey]:
  """The block linears (spec 3.1's default); with `all_linears` also every block's adaLN linear, the embedders
  and the final layer, in model order."""
  blocks = [(f"block_{i}", name) for i in range(config.depth)
            for name in ((("adaLN",) if all_linears else ()) + BLOCK_LINEARS)]
  if not all_linears:
    return blocks
  outer = [(name,) for name in OUTER_LINEARS]
  return outer[:3] + blocks + outer[3:]


def layer_entry(tree: dict, key: LayerKey):
  """The entry of a per-linear tree (params, quant, intermediates) at a linear's path."""
  for name in key:
    tree = tree[name]
  return tree


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
    for key in quantised_layers(config, all_linears=True):
      (inputs,) = layer_entry(state["intermediates"], key)["input"]
      flat = inputs.reshape(-1, inputs.shape[-1])
      out[key] = {"min": flat.min(0), "max": flat.max(0)}
    return out

  return jax.lax.map(step_stats, (trajectory, timesteps, jnp.arange(trajectory.shape[0])))
