"""Inference placement of a MoE model's routed experts in pinned host memory (the offloading baseline)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pangu.models.config import TransformerConfig
from pangu.models.transformer import unstack_layers
from pangu.parallel import host_memory

ROUTED_KERNELS = ("gate", "up", "down")


def offload_experts(config: TransformerConfig, params: dict, *, dtype: str | None = None,
                    device: jax.Device | None = None) -> tuple[TransformerConfig, dict]:
  """(config, params) -> the same model with every routed expert kernel in `device`'s pinned host memory.

  dtype: the host copy's dtype (None: as the params are), e.g. float16 to move what a float16 MoLE table
  moves per value. Layers are unrolled (a layer scan would slice the stacked host arrays on the device); each
  call then copies in only the experts its tokens selected (pangu.nn.moe.offload).
  """
  if config.moe is None:
    raise ValueError("offload_experts needs a MoE model (config.moe is None)")
  device = device or jax.devices()[0]
  host = host_memory.pinned_host_sharding(device, "keep the experts on the device")
  if config.scanned:
    params = unstack_layers(params, config.n_layers)
  config = config.replace(scan_layers=False, moe=dataclasses.replace(config.moe, expert_storage="host"))

  def place(layer: dict) -> dict:
    if "moe" not in layer:
      return layer
    moe = {k: jax.device_put(np.asarray(v).astype(jnp.dtype(dtype or v.dtype)), host) if k in ROUTED_KERNELS else v
           for k, v in layer["moe"].items()}
    return {**layer, "moe": moe}

  return config, {k: place(v) if k.startswith("layer_") else v for k, v in params.items()}


def expert_bytes(config: TransformerConfig, dtype: str | None = None) -> int:
  """Bytes of one routed expert (gate, up and down kernels) stored in `dtype` (None: the param dtype), what
  offloading copies per selected expert."""
  itemsize = jnp.dtype(dtype or config.param_dtype).itemsize
  return 3 * config.d_model * config.moe.expert_dim * itemsize
