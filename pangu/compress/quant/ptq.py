"""Post-training quantisation of a DiT's block linears (qkv, proj, fc1, fc2) with one of the methods:

  * `naive`: per-tensor weights and one per-tensor activation range over all steps (plain min-max PTQ);
  * `minmax`: per-output-channel weights, one activation range over all steps;
  * `smoothquant`: time-agnostic SmoothQuant-style smoothing (`PTQConfig.smoothquant`), folded, then `minmax`;
  * `ptq4dit`: PTQ4DiT-style channel balancing (our simplification), folded, then `minmax`;
  * `htg`: timestep-aware shift and scale, contiguous timestep groups, folded; activation ranges per
    (layer, group) unless `act_range_per_group=False`.

Embedders, adaLN linears and the final layer stay in float (spec 3.1) unless `quantise_all_linears`. Steps:
smoothing plans from the float model's per-step input stats (on every sampler step, or `calib_timesteps` of them
spread uniformly, spec 3.2) -> re-parameterise -> the folded model's input stats (`smoothed_stats`, in closed
form) -> activation ranges (min-max from those stats, or a percentile or MSE estimate from histograms of the
folded float model's inputs, `ranges`) -> weights rounded to nearest, or by GPTQ on the folded inputs' Hessian
(`gptq`, `input_hessian`), then fake-quantised in float or kept as real int8 for W8A8; HTG's folded shift term
moved onto the rounded kernel unless `HTGConfig.shift_compensation='float'`.
"""

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from pangu.compress.quant.calibration import (ATTENTION_OPERANDS, Histograms, LayerKey, Moments, Stats,
                                              layer_entry, quantised_layers)
from pangu.compress.quant.gptq import gptq_levels
from pangu.compress.quant.grouping import collapse, nearest_calibrated, uniform_steps
from pangu.compress.quant.ranges import ESTIMATORS, Estimate, RangeEstimator, range_estimator
from pangu.compress.quant.reparam import Plans, ProjSmoothing, reparameterise
from pangu.compress.quant.smoothing import (HTGConfig, SmoothingPlan, SmoothQuantConfig, htg_plan, ptq4dit_plan,
                                            smoothquant_plan)
from pangu.config_checks import one_of
from pangu.models.dit import DiTConfig
from pangu.nn.quantized import quantise_symmetric, step_table, symmetric_scale

Method = Literal["naive", "minmax", "smoothquant", "ptq4dit", "htg"]
METHODS = ("naive", "minmax", "smoothquant", "ptq4dit", "htg")
WeightRounding = Literal["nearest", "gptq"]
WEIGHT_ROUNDINGS = ("nearest", "gptq")
# (folded float params, their quant collection, each linear's (lo, hi)) -> per-step histograms of every linear's
# input over its bounds on the calibration trajectory: `calibration.collect_input_histograms` bound to it.
Recollect = Callable[[dict, dict, dict[LayerKey, tuple[float, float]]], Histograms]


@dataclasses.dataclass(frozen=True)
class PTQConfig:
  """Attributes:
    method: see the module docstring.
    weight_bits: 8 or 4 (symmetric, [-127, 127] or [-7, 7]); None keeps the (folded) kernels in float.
    act_bits: 8 (asymmetric, static, per tensor); None keeps the linears' inputs in float. With one of the two
      None, a quantised model's error splits into what its weights and its activations each cost (e.g. W4A16
      against W16A8 of the same smoothing).
    htg: the HTG settings (method `htg` only).
    smoothquant: the SmoothQuant-style settings (method `smoothquant` only).
    proj_smoothing: `fold_v` or `explicit` (spec 3.7).
    fc2_smoothing: `explicit` or `none`.
    act_range_per_group: HTG's activation ranges per (layer, group); False: one range per layer.
    weight_rounding: `nearest` (spec 3.8) or `gptq`: the same grid, each kernel row's rounding error compensated
      on the rows after it through the Hessian of the layer's (folded) inputs (`pangu.compress.quant.gptq`; our
      extension, the paper's weight rounding is unstated). `gptq` reads `quantise_dit`'s `moments`.
    integer: run W8A8 through the real int8 x int8 -> int32 path instead of fake-quant.
    quantise_all_linears: also quantise every block's adaLN linear, the embedders and the final layer (the
      method's weight quantiser and one activation range over all steps; no smoothing: they have no plan).
      Default: the block linears alone (spec 3.1, our choice; unconfirmed).
    calib_timesteps: calibrate on this many sampler steps spread uniformly, both ends included (R1: 25 of 100);
      every other step takes the group, shift and activation range of its nearest calibrated step, ties to the
      noisier. G's default counts the calibrated steps. None: every step (spec 3.2's default).
    act_range_estimator: `minmax` (default), `percentile` or `mse` (`pangu.compress.quant.ranges`, spec 3.8);
      the last two read histograms of the folded float model's inputs (`quantise_dit`'s `recollect`).
    act_percentile: p of the percentile estimator, in (50, 100].
    quantise_attention: the attention matmuls (q k^T, p v) take quantised inputs (`QuantAttention`): q, k and v
      on min-max ranges per group of the linear whose output they are (qkv; v under `fold_v` carries proj's
      smoothing and takes its groups), the probabilities on [0, 1]. Default: float (spec 3.8).
  """

  method: Method = "htg"
  weight_bits: int | None = 8
  act_bits: int | None = 8
  htg: HTGConfig = HTGConfig()
  smoothquant: SmoothQuantConfig = SmoothQuantConfig()
  proj_smoothing: ProjSmoothing = "fold_v"
  fc2_smoothing: Literal["explicit", "none"] = "explicit"
  act_range_per_group: bool = True
  weight_rounding: WeightRounding = "nearest"
  integer: bool = False
  quantise_all_linears: bool = False
  calib_timesteps: int | None = None
  act_range_estimator: RangeEstimator = "minmax"
  act_percentile: float = 99.99
  quantise_attention: bool = False

  def __post_init__(self):
    one_of(self, "method", METHODS)
    one_of(self, "act_range_estimator", ESTIMATORS)
    if not 50.0 < self.act_percentile <= 100.0:
      raise ValueError(f"PTQConfig.act_percentile must be in (50, 100], got {self.act_percentile!r}")
    one_of(self, "weight_bits", (4, 8, None))
    one_of(self, "act_bits", (8, None))
    one_of(self, "proj_smoothing", ("fold_v", "explicit"))
    one_of(self, "fc2_smoothing", ("explicit", "none"))
    one_of(self, "weight_rounding", WEIGHT_ROUNDINGS)
    if self.calib_timesteps is not None and (not isinstance(self.calib_timesteps, int) or self.calib_timesteps < 1):
      raise ValueError(f"PTQConfig.calib_timesteps must be a positive int or None, got {self.calib_timesteps!r}")
    if self.integer and (self.weight_bits, self.act_bits) != (8, 8):
      raise ValueError(f"PTQConfig.integer needs weight_bits=8 and act_bits=8, got {self.weight_bits} and "
                       f"{self.act_bits}")
    if self.quantise_attention and self.act_bits is None:
      raise ValueError("PTQConfig.quantise_attention quantises the attention matmuls' inputs, but act_bits is None")


def smoothing_plans(config: DiTConfig, params: dict, stats: Stats, ptq: PTQConfig) -> Plans:
  plans = {}
  for block, name in quantised_layers(config):
    if name == "fc2" and ptq.fc2_smoothing == "none":
      continue
    kernel, layer_stats = np.asarray(params[block][name]["kernel"]), stats[(block, name)]
    if ptq.method == "htg":
      htg = ptq.htg if name in ptq.htg.scaled_layers else dataclasses.replace(ptq.htg, use_scale=False)
      plans[(block, name)] = htg_plan(layer_stats, kernel, htg)
    elif ptq.method == "smoothquant" and name in ptq.smoothquant.scaled_layers:
      plans[(block, name)] = smoothquant_plan(layer_stats, kernel, ptq.smoothquant.migration)
    elif ptq.method == "ptq4dit":
      plans[(block, name)] = ptq4dit_plan(layer_stats, kernel)
  return plans


def smoothed_stats(stats: Stats, plans: Plans) -> Stats:
  """The per-step input stats of the re-parameterised model from the float model's, without running it.

  Every fold of `reparam` makes a smoothed linear's input X_hat = (X - z_g) / s channel by channel, with s > 0,
  so each channel's min and max map through the same affine function (layers without a plan keep theirs).
  Running the folded model over the calibration trajectory again gives the same stats up to float rounding
  (`tests/compress/test_quant.py`) and costs as much as the first pass, for every setting `select` tries.
  """
  smoothed = dict(stats)
  for key, plan in plans.items():
    shift, scale = plan.shift_per_step(), plan.scale
    smoothed[key] = {"min": (stats[key]["min"] - shift) / scale, "max": (stats[key]["max"] - shift) / scale}
  return smoothed


def activation_ranges(stats: dict[str, np.ndarray], group_of_step: np.ndarray,
                      calibrated_of_step: np.ndarray | None = None, estimate: Estimate | None = None,
                      counts: np.ndarray | None = None, bounds: tuple[float, float] | None = None) -> dict:
  """A step table of (lo, hi) per group: the extreme values over the group's steps and all channels, or what
  `estimate` makes of the group's summed histogram (counts [S, bins] over bounds) given those extremes.

  stats, group_of_step and counts cover the calibrated steps; the table covers every sampler step, step i reading
  calibrated step calibrated_of_step[i] (None: the calibrated steps are all of them)."""
  lo, hi = np.asarray(stats["min"]).min(1), np.asarray(stats["max"]).max(1)
  values = []
  for g in range(int(group_of_step.max()) + 1):
    extremes = (float(lo[group_of_step == g].min()), float(hi[group_of_step == g].max()))
    values.append(extremes if estimate is None else estimate(counts[group_of_step == g].sum(0), bounds, extremes))
  values = np.asarray(values)
  every_step = group_of_step if calibrated_of_step is None else group_of_step[calibrated_of_step]
  return step_table(jnp.asarray(values, jnp.float32), every_step)


def quantise_dit(config: DiTConfig, params: dict, stats: Stats, ptq: PTQConfig, recollect: Recollect | None = None,
                 moments: Moments | None = None) -> tuple[dict, dict, dict]:
  """(float params, the float model's per-step input stats on the calibration trajectory
  (`calibration.collect_input_stats`)) -> (params, quant collection, report). `recollect`: histograms of the
  folded float model's inputs on that trajectory, needed by the percentile and MSE range estimators only;
  `moments`: the float model's input moments on it (`calibration.collect_input_moments`), needed by GPTQ only.

  report: {"plans": the smoothing plans (on the calibrated steps), "extra_bytes": bytes of per-group tables and
  smoothing vectors, "weight_bytes": packed quantised kernels and their scales}.
  """
  n_steps = next(iter(stats.values()))["min"].shape[0]
  if ptq.weight_rounding == "gptq" and ptq.weight_bits is not None and moments is None:
    raise ValueError("PTQConfig.weight_rounding='gptq' reads the Hessian of each layer's inputs: quantise_dit needs "
                     "`moments`")
  calibrated = uniform_steps(n_steps, ptq.calib_timesteps)
  calibrated_of_step = nearest_calibrated(calibrated, n_steps)
  stats = {key: {extreme: np.asarray(v)[calibrated] for extreme, v in layer.items()} for key, layer in stats.items()}
  plans = smoothing_plans(config, params, stats, ptq)
  every_step = {key: plan.on_steps(calibrated_of_step) for key, plan in plans.items()}
  params, quant = reparameterise(config, params, every_step, n_steps, ptq.proj_smoothing)
  smoothed = smoothed_stats(stats, plans)
  layers = quantised_layers(config, ptq.quantise_all_linears)
  bounds, histograms = {}, {}
  estimate = (None if ptq.act_bits is None else
              range_estimator(ptq.act_range_estimator, ptq.act_percentile, ptq.act_bits))
  if estimate is not None:
    if recollect is None:
      raise ValueError(f"PTQConfig.act_range_estimator={ptq.act_range_estimator!r} reads histograms of the "
                       "smoothed inputs: quantise_dit needs `recollect`")
    bounds = {key: (float(smoothed[key]["min"].min()), float(smoothed[key]["max"].max())) for key in layers}
    histograms = {key: np.asarray(counts)[calibrated] for key, counts in recollect(params, quant, bounds).items()}
  weight_bytes = 0
  for key in layers:
    plan = plans.get(key)
    layer_quant = _entry(quant, key)
    if ptq.act_bits is not None:
      layer_quant["act_range"] = activation_ranges(smoothed[key], _range_groups(ptq, plan, len(calibrated)),
                                                   calibrated_of_step, estimate, histograms.get(key),
                                                   bounds.get(key))
    kernel = layer_entry(params, key)["kernel"]
    if ptq.weight_bits is None:
      weight_bytes += kernel.size * 4
      continue
    per_channel = ptq.method != "naive"  # one grid per output channel, or one per tensor
    if ptq.weight_rounding == "gptq":
      hessian = input_hessian(moments[key], every_step.get(key), ptq.htg.shift_compensation)
      levels, scale = (jnp.asarray(a, jnp.float32) for a in gptq_levels(np.asarray(kernel), hessian,
                                                                         ptq.weight_bits, per_channel))
    else:
      scale = symmetric_scale(kernel, ptq.weight_bits, axis=0 if per_channel else None)
      levels = quantise_symmetric(kernel, scale, ptq.weight_bits)
    if ptq.integer:
      layer_quant["kernel_int8"] = levels.astype(jnp.int8)
      layer_quant["kernel_scale"] = jnp.broadcast_to(scale[0], kernel.shape[1:])
    rounded = levels * scale
    if plan is not None and ptq.htg.shift_compensation == "quantised":
      layer_quant["bias_table"] = compensate_shift(layer_quant["bias_table"], every_step[key], kernel, rounded)
    _replace_kernel(params, key, rounded)
    weight_bytes += kernel.size * ptq.weight_bits // 8 + 4 * (kernel.shape[1] if per_channel else 1)
  if ptq.quantise_attention:
    for block in (f"block_{i}" for i in range(config.depth)):
      attention = _entry(quant, (block, "attention"))
      for name in ATTENTION_OPERANDS:
        key, source = (block, "attention", name), "proj" if name == "v" and ptq.proj_smoothing == "fold_v" else "qkv"
        plan, operand = plans.get((block, source)), stats[key]
        if plan is not None and source == "proj":
          operand = smoothed_stats({key: operand}, {key: plan})[key]
        attention[f"{name}_range"] = activation_ranges(operand, _range_groups(ptq, plan, len(calibrated)),
                                                       calibrated_of_step)
  return params, quant, {"plans": plans, "weight_bytes": weight_bytes, "extra_bytes": table_bytes(quant)}


def input_hessian(moments: dict, plan: SmoothingPlan | None, shift_compensation: str) -> np.ndarray:
  """The Gram matrix of what a folded linear's rounding error multiplies, over the calibration trajectory, from the
  float model's input moments (one layer's `collect_input_moments` entry; `plan` on every sampler step).

  A smoothed layer computes X_hat Q(W_hat) + b + (z_g / s) K with X_hat = (X - z_g) / s, K the kernel its folded
  shift term uses: Q(W_hat) (`quantised`), so its error (X / s)(Q(W_hat) - W_hat) moves with X / s; or W_hat
  (`float`), so it moves with X_hat. Per step, sum (X - c)^T (X - c) = G - c^T m - m^T c + n c^T c for the rows'
  Gram G, sum m and count n, then scaled by 1 / s on both sides.
  """
  gram = np.asarray(moments["gram"], np.float64)
  if plan is None:
    return gram
  if shift_compensation == "float":
    centre, sums = plan.shift_per_step(), np.asarray(moments["sum"], np.float64)
    cross = centre.T @ sums
    gram = gram - cross - cross.T + moments["count"] * centre.T @ centre
  return gram / np.outer(plan.scale, plan.scale)


def _range_groups(ptq: PTQConfig, plan: SmoothingPlan | None, n_calibrated: int) -> np.ndarray:
  """The groups an activation range is kept per: the plan's for HTG (unless `act_range_per_group=False`), one
  otherwise."""
  if ptq.method == "htg" and ptq.act_range_per_group and plan is not None:
    return plan.group_of_step
  return np.zeros(n_calibrated, np.int32)


def _entry(quant: dict, key: LayerKey) -> dict:
  """The quant collection's dict at a module's path, created where missing."""
  for name in key:
    quant = quant.setdefault(name, {})
  return quant


def _replace_kernel(params: dict, key: LayerKey, kernel: jax.Array) -> None:
  """Sets a linear's kernel in `reparameterise`'s output, whose top level and blocks are fresh dicts."""
  parent = layer_entry(params, key[:-1])
  parent[key[-1]] = dict(parent[key[-1]], kernel=kernel)


def compensate_shift(bias_table: dict, plan: SmoothingPlan, kernel: jax.Array, rounded: jax.Array) -> dict:
  """The folded bias table with its shift term moved onto the rounded kernel: + (z_g / s) (Q(W_hat) - W_hat).

  The re-parameterised layer computes X_hat W_hat + b + (z_g / s) W_hat with X_hat = (X - z_g) / s (every fold
  of `reparam` keeps this form, the V columns of qkv included). The table's groups refine the plan's, so the
  per-step correction is constant within each of them.
  """
  delta = np.asarray(rounded, np.float64) - np.asarray(kernel, np.float64)
  correction = (plan.shift_per_step() / plan.scale) @ delta
  table_groups = np.asarray(bias_table["group_of_step"])
  values = np.asarray(bias_table["values"], np.float64) + collapse(correction, table_groups)
  return step_table(jnp.asarray(values, jnp.float32), table_groups)


def table_bytes(quant: dict) -> int:
  """Bytes of the per-step machinery a method adds: bias tables, shifts, scales, ranges and step->group maps
  (float32 / int32), not the integer kernels."""
  total = 0
  for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(quant):
    if "kernel_int8" in jax.tree_util.keystr(leaf_path) or "kernel_scale" in jax.tree_util.keystr(leaf_path):
      continue
    total += leaf.size * 4
  return total

