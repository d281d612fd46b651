"""Re-parameterisation (HTG Alg. 2, spec 3.7): fold X_hat = (X - z_g) / s into the DiT so the smoothed model
computes the same function and the quantisers see X_hat.

Per block, for plans of qkv, proj, fc1 and fc2 (any may be absent):
  * every smoothed linear: W_hat = diag(s) W and a per-step bias b + z_t W (a table over its groups);
  * qkv and fc1 (inputs LN(x)(1 + gamma) + beta): the adaLN linear's beta columns / s with bias
    (b_beta - z_t) / s, its gamma columns / s with bias (1 + b_gamma) / s - 1, giving exactly
    (LN(x)(1 + gamma) + beta - z_t) / s;
  * proj (`fold_v`): softmax rows sum to 1, so A (v - z) / s = (A v - z) / s: the V columns of qkv / s_o and
    the V bias (b_v + z^qkv_t W_v - z^o_t) / s_o. `explicit`: (x - z_g) / s on the fly, like fc2;
  * fc2 (after GELU, nothing to fold into): applied on the fly (`explicit`) or left alone (`none`).
A bias that depends on several layers' groups is stored over their common refinement. The outputs are the
float model's params with folded kernels (same shapes) and a `quant` collection for `pangu.nn.quantized`.
"""

from typing import Literal

import jax.numpy as jnp
import numpy as np

from pangu.compress.quant.grouping import collapse, common_refinement
from pangu.compress.quant.smoothing import SmoothingPlan
from pangu.models.dit import DiTConfig
from pangu.nn.quantized import step_table

ProjSmoothing = Literal["fold_v", "explicit"]
Plans = dict[tuple[str, str], SmoothingPlan]


def _table(per_step: np.ndarray, *groupings: np.ndarray) -> dict:
  groups = common_refinement(*groupings) if groupings else np.zeros(per_step.shape[0], np.int32)
  return step_table(jnp.asarray(collapse(per_step, groups), jnp.float32), groups)


def _set(quant: dict, block: str, layer: str, name: str, value) -> None:
  quant.setdefault(block, {}).setdefault(layer, {})[name] = value


def reparameterise(config: DiTConfig, params: dict, plans: Plans, n_steps: int,
                   proj_smoothing: ProjSmoothing = "fold_v") -> tuple[dict, dict]:
  """(params, plans) -> (folded params, quant collection). Plans map (block, linear) to a `SmoothingPlan`."""
  if proj_smoothing not in ("fold_v", "explicit"):
    raise ValueError(f"proj_smoothing must be 'fold_v' or 'explicit', got {proj_smoothing!r}")
  for key, plan in plans.items():
    if len(plan.group_of_step) != n_steps:
      raise ValueError(f"plan {key} covers {len(plan.group_of_step)} steps, expected {n_steps}")
  d = config.d_model
  params = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
  quant: dict = {}
  for i in range(config.depth):
    block = f"block_{i}"
    layers = {name: {k: np.asarray(v, np.float64) for k, v in params[block][name].items()}
              for name in ("adaLN", "qkv", "proj", "fc1", "fc2")}
    # Per-step biases [S, C_out], filled in as folds apply, and the groupings each one depends on.
    biases = {name: np.broadcast_to(layer["bias"], (n_steps, *layer["bias"].shape)).copy()
              for name, layer in layers.items()}
    depends = {name: [] for name in layers}
    original = {name: layer["kernel"].copy() for name, layer in layers.items()}

    def smooth_linear(name):
      plan = plans[(block, name)]
      biases[name] += plan.shift_per_step() @ original[name]
      layers[name]["kernel"] = plan.scale[:, None] * layers[name]["kernel"]
      depends[name].append(plan.group_of_step)
      return plan

    for name, offset in (("qkv", 0), ("fc1", 3 * d)):
      if (block, name) not in plans:
        continue
      plan = smooth_linear(name)
      beta, gamma = slice(offset, offset + d), slice(offset + d, offset + 2 * d)
      layers["adaLN"]["kernel"][:, beta] /= plan.scale
      layers["adaLN"]["kernel"][:, gamma] /= plan.scale
      biases["adaLN"][:, beta] = (biases["adaLN"][:, beta] - plan.shift_per_step()) / plan.scale
      biases["adaLN"][:, gamma] = (1 + biases["adaLN"][:, gamma]) / plan.scale - 1
      depends["adaLN"].append(plan.group_of_step)
    if (block, "proj") in plans:
      plan = smooth_linear("proj")
      if proj_smoothing == "fold_v":
        v = slice(2 * d, 3 * d)
        layers["qkv"]["kernel"][:, v] /= plan.scale
        biases["qkv"][:, v] = (biases["qkv"][:, v] - plan.shift_per_step()) / plan.scale
        depends["qkv"].append(plan.group_of_step)
      else:
        _set(quant, block, "proj", "input_shift", step_table(jnp.asarray(plan.shift, jnp.float32), plan.group_of_step))
        _set(quant, block, "proj", "input_scale", jnp.asarray(plan.scale, jnp.float32))
    if (block, "fc2") in plans:
      plan = smooth_linear("fc2")
      _set(quant, block, "fc2", "input_shift", step_table(jnp.asarray(plan.shift, jnp.float32), plan.group_of_step))
      _set(quant, block, "fc2", "input_scale", jnp.asarray(plan.scale, jnp.float32))
    block_params = dict(params[block])
    for name, layer in layers.items():
      block_params[name] = {"kernel": jnp.asarray(layer["kernel"], jnp.float32),
                            "bias": jnp.asarray(layer["bias"], jnp.float32)}
      if depends[name]:
        _set(quant, block, name, "bias_table", _table(biases[name], *depends[name]))
    params[block] = block_params
  return params, quant
