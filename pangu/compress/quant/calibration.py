"""Calibration capture: per sampler step, the per-channel min and max of every quantised linear's input, (for
the percentile and MSE range estimators) per-tensor histograms of its values, and (for GPTQ's weight rounding)
its first and second moments.

The inputs come from `QuantDense`'s `sow("intermediates", "input", ...)`: the tensor the activation quantiser
sees: the raw inputs of the float model (for shifts, scales and, mapped through them, activation ranges:
`ptq.smoothed_stats`) or the smoothed inputs of a re-parameterised one. Trajectories come from the float
sampler (pangu.diffusion.samplers returns them); with guidance the batch is doubled with null labels, as the
sampler runs it. Every linear's stats are collected (a min and a max per step and channel are cheap), and those of
the attention matmuls' inputs (`QuantAttention`'s q, k, v), so one capture serves the block linears alone (spec
3.1's default), `PTQConfig.quantise_all_linears` and `PTQConfig.quantise_attention`.
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
Histograms = dict[LayerKey, np.ndarray]  # layer -> [S, bins] counts of its input values over its bounds
# layer -> {"gram": [C, C] sum over steps and rows of x x^T, "sum": [S, C] per-step sum of the rows, "count": rows a
# step}: enough to give the Gram matrix of any per-step affine map of the inputs (`ptq.input_hessian`).
Moments = dict[LayerKey, dict[str, np.ndarray | int]]
ATTENTION_OPERANDS = ("q", "k", "v")
HISTOGRAM_BINS = 2048  # 8 bins per level of an 8-bit activation grid spanning the whole range


def quantised_layers(config: DiTConfig, all_linears: bool = False) -> list[LayerKey]:
  """The block linears (spec 3.1's default); with `all_linears` also every block's adaLN linear, the embedders
  and the final layer, in model order."""
  blocks = [(f"block_{i}", name) for i in range(config.depth)
            for name in ((("adaLN",) if all_linears else ()) + BLOCK_LINEARS)]
  if not all_linears:
    return blocks
  outer = [(name,) for name in OUTER_LINEARS]
  return outer[:3] + blocks + outer[3:]


def attention_operands(config: DiTConfig) -> list[LayerKey]:
  """Every block's attention matmul inputs, (block name, "attention", "q" | "k" | "v"): their stats have one
  channel per head and head dimension ([rows, A Dh], the qkv linear's column order)."""
  return [(f"block_{i}", "attention", name) for i in range(config.depth) for name in ATTENTION_OPERANDS]


def layer_entry(tree: dict, key: LayerKey):
  """The entry of a per-linear tree (params, quant, intermediates) at a linear's path."""
  for name in key:
    tree = tree[name]
  return tree


def collect_input_stats(config: DiTConfig, params: dict, quant: dict | None, trajectory: jax.Array,
                        timesteps: np.ndarray, labels: jax.Array, guidance: float) -> Stats:
  """trajectory [S, B, H, W, C] (the sampler's step inputs), timesteps [S] -> per-step channel min / max."""
  _check_steps(trajectory, timesteps)
  return jax.tree.map(np.asarray, _stats(config, guidance, _variables(params, quant), trajectory,
                                         jnp.asarray(timesteps), labels))


def collect_input_histograms(config: DiTConfig, params: dict, quant: dict | None, trajectory: jax.Array,
                             timesteps: np.ndarray, labels: jax.Array, guidance: float,
                             bounds: dict[LayerKey, tuple[float, float]],
                             bins: int = HISTOGRAM_BINS) -> Histograms:
  """Per step, counts of each bounded linear's input values in `bins` equal bins over its (lo, hi) (values
  outside land in the end bins): what a percentile or MSE range estimator reads (spec 3.8), collected from the
  re-parameterised float model so they are the smoothed inputs the activation quantisers see."""
  _check_steps(trajectory, timesteps)
  keys = tuple(bounds)
  lows, highs = (jnp.asarray([bounds[key][i] for key in keys], jnp.float32) for i in (0, 1))
  counts = _histograms(config, guidance, keys, bins, _variables(params, quant), trajectory, jnp.asarray(timesteps),
                       labels, lows, highs)
  return {key: np.asarray(counts[i]) for i, key in enumerate(keys)}


def collect_input_moments(config: DiTConfig, params: dict, quant: dict | None, trajectory: jax.Array,
                          timesteps: np.ndarray, labels: jax.Array, guidance: float) -> Moments:
  """Every linear's input moments over the trajectory (the float model's: GPTQ's Hessian of a smoothed input
  follows in closed form, as the smoothed stats do)."""
  _check_steps(trajectory, timesteps)
  grams, (sums, rows) = _moments(config, guidance, _variables(params, quant), trajectory, jnp.asarray(timesteps),
                                 labels)
  return {key: {"gram": np.asarray(grams[key], np.float64), "sum": np.asarray(sums[key], np.float64),
                "count": int(rows[key][0])} for key in grams}


def _check_steps(trajectory: jax.Array, timesteps: np.ndarray) -> None:
  if trajectory.shape[0] != len(timesteps):
    raise ValueError(f"trajectory has {trajectory.shape[0]} steps but {len(timesteps)} timesteps were given")


def _variables(params: dict, quant: dict | None) -> dict:
  return {"params": params} | ({"quant": quant} if quant else {})


def _layer_inputs(config: DiTConfig, guidance: float, variables: dict, x: jax.Array, tau: jax.Array,
                  step: jax.Array, labels: jax.Array) -> dict[LayerKey, jax.Array]:
  """Every linear's input [rows, C_in] and every attention operand [rows, A Dh] at one sampler step; with guidance
  the batch doubled with null labels, as the sampler runs it."""
  if guidance != 1.0:
    x, labels = jnp.concatenate([x, x]), jnp.concatenate([labels, jnp.full_like(labels, config.n_classes)])
  _, state = DiT(config).apply(variables, x, jnp.full(labels.shape, tau), labels, step, mutable=["intermediates"])
  inputs = {}
  for key in quantised_layers(config, all_linears=True):
    (value,) = layer_entry(state["intermediates"], key)["input"]
    inputs[key] = value.reshape(-1, value.shape[-1])
  for key in attention_operands(config):
    (value,) = layer_entry(state["intermediates"], key)
    inputs[key] = value.reshape(value.shape[0] * value.shape[1], -1)
  return inputs


@functools.partial(jax.jit, static_argnums=(0, 1))
def _stats(config: DiTConfig, guidance: float, variables: dict, trajectory: jax.Array, timesteps: jax.Array,
           labels: jax.Array) -> Stats:
  """Every step in one compiled loop (the model's weights are arguments, not constants)."""
  def step_stats(args):
    inputs = _layer_inputs(config, guidance, variables, *args, labels)
    return {key: {"min": flat.min(0), "max": flat.max(0)} for key, flat in inputs.items()}

  return jax.lax.map(step_stats, (trajectory, timesteps, jnp.arange(trajectory.shape[0])))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _moments(config: DiTConfig, guidance: float, variables: dict, trajectory: jax.Array, timesteps: jax.Array,
             labels: jax.Array) -> tuple[dict, tuple[dict, dict]]:
  """(Gram matrices summed over the steps, ([S, C] row sums, [S] row counts)): a scan, so no [S, C, C] stack is
  ever held."""
  keys = quantised_layers(config, all_linears=True)

  def step_moments(grams, args):
    inputs = _layer_inputs(config, guidance, variables, *args, labels)
    grams = {key: grams[key] + jnp.dot(inputs[key].T, inputs[key], precision="highest") for key in keys}
    return grams, ({key: inputs[key].sum(0) for key in keys}, {key: jnp.int32(inputs[key].shape[0]) for key in keys})

  widths = {key: layer_entry(variables["params"], key)["kernel"].shape[0] for key in keys}
  initial = {key: jnp.zeros((widths[key], widths[key]), jnp.float32) for key in keys}
  return jax.lax.scan(step_moments, initial, (trajectory, timesteps, jnp.arange(trajectory.shape[0])))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _histograms(config: DiTConfig, guidance: float, keys: tuple[LayerKey, ...], bins: int, variables: dict,
                trajectory: jax.Array, timesteps: jax.Array, labels: jax.Array, lows: jax.Array,
                highs: jax.Array) -> jax.Array:
  """[L, S, bins] counts (a scatter-add per layer and step: 16M values take ~45 ms on one CPU core)."""
  def step_counts(args):
    inputs = _layer_inputs(config, guidance, variables, *args, labels)
    counts = []
    for i, key in enumerate(keys):
      width = jnp.maximum(highs[i] - lows[i], 1e-12) / bins
      index = jnp.clip(jnp.floor((inputs[key].ravel() - lows[i]) / width), 0, bins - 1).astype(jnp.int32)
      counts.append(jnp.zeros(bins, jnp.int32).at[index].add(1))
    return jnp.stack(counts)

  return jnp.moveaxis(jax.lax.map(step_counts, (trajectory, timesteps, jnp.arange(trajectory.shape[0]))), 0, 1)
