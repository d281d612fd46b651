"""The projection policy, projection kernels in either stored layout, and the one place weights meet activations.

Every product of an activation with a weight in the library (attention q/k/v/o, the MLP, MoE routers and
experts, MoLE experts, the LM head) goes through `weight_einsum` or `weight_ragged_dot`, which read the weight
through `prepare_weight`. A quantised weight format (int8 / int4 with scales) therefore plugs in at one spot:
`prepare_weight` dequantises it, or the two functions call a low-bit kernel, and every layer follows.

`ProjectionConfig.layout` says how every dense projection kernel is stored:
  * `training`: [*in, *out], e.g. q [D, H, Dh] and down [F, D]: the layout of checkpoints and the optimizer.
  * `decode`: [*out, *in], e.g. q [H, Dh, D] and down [D, F]. A decode step multiplies only B rows by every
    weight: XLA:CPU runs those skinny matmuls faster when the contracted axis is the kernel's minor one, and
    on CPU they go to pangu_kernels.skinny_matmul, an FFI kernel that streams each [out, in] weight row once
    (experiments/bench_decode.py). `pangu.models.param_layout.convert_param_layout` transposes once, when a
    generation engine is built. The layout is for inference: the kernel has no gradient.
Logical axis names travel with the axes, so sharding rules apply unchanged to both layouts.
"""

import dataclasses
from collections.abc import Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from pangu.config_checks import one_of
from pangu_kernels.skinny_matmul import skinny_matmul

ParamLayout = Literal["training", "decode"]
PARAM_LAYOUTS = ("training", "decode")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
  """How a layer stores and applies its projection kernels.

  Attributes:
    layout: `training` ([in, out] kernels) or `decode` ([out, in] kernels; see the module docstring).
    dtype: compute dtype: kernels are cast to it before the product.
    param_dtype: storage dtype of the kernels (float32 masters for training).
  """

  layout: ParamLayout = "training"
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    one_of(self, "layout", PARAM_LAYOUTS)
    one_of(self, "dtype", DTYPES)
    one_of(self, "param_dtype", DTYPES)


def prepare_weight(w: jax.Array) -> jax.Array:
  """The weight as the product reads it. Plain arrays pass through; a quantised format dequantises here."""
  return w


def weight_einsum(equation: str, x: jax.Array, w: jax.Array, *,
                  preferred_element_type: jnp.dtype | None = None) -> jax.Array:
  """`jnp.einsum(equation, x, w)` with x an activation and w a weight: the one dense activation-weight product."""
  return jnp.einsum(equation, x, prepare_weight(w), preferred_element_type=preferred_element_type)


def weight_ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """Rows x [R, K] sorted into groups, w [G, K, N] one weight per group -> [R, N] (`jax.lax.ragged_dot`)."""
  return jax.lax.ragged_dot(x, prepare_weight(w), group_sizes)


def kernel(module: nn.Module, config: ProjectionConfig, name: str, in_shape: Sequence[int],
           out_shape: Sequence[int], in_axes: Sequence[str | None], out_axes: Sequence[str | None],
           init: jax.nn.initializers.Initializer) -> jax.Array:
  """Declares (or reads) the kernel of a projection from in_shape to out_shape, cast to the compute dtype."""
  if config.layout == "decode":
    shape, axes = (*out_shape, *in_shape), (*out_axes, *in_axes)
  else:
    shape, axes = (*in_shape, *out_shape), (*in_axes, *out_axes)
  w = module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(config.param_dtype))
  return w.astype(config.dtype)


def project(x: jax.Array, w: jax.Array, config: ProjectionConfig, in_rank: int = 1,
            preferred_element_type: jnp.dtype | None = None) -> jax.Array:
  """x [..., *in] times a kernel from `kernel` -> [..., *out], contracting the last `in_rank` axes of x.

  Both sides are flattened to one contracted and one output axis first: with several, XLA:CPU transposes the
  weight on every call instead of the activation.
  """
  in_shape = x.shape[x.ndim - in_rank:]
  decode = config.layout == "decode"
  out_shape = w.shape[:w.ndim - in_rank] if decode else w.shape[in_rank:]
  if (w.shape[w.ndim - in_rank:] if decode else w.shape[:in_rank]) != in_shape:
    raise ValueError(f"project: input axes {in_shape} do not match kernel {w.shape} ({config.layout} layout)")
  x2 = x.reshape(*x.shape[:x.ndim - in_rank], -1)
  if decode:
    y = project_out_in(x2, w.reshape(-1, x2.shape[-1]), config, preferred_element_type)
  else:
    y = weight_einsum("...i,io->...o", x2, w.reshape(x2.shape[-1], -1), preferred_element_type=preferred_element_type)
  return y.reshape(*y.shape[:-1], *out_shape)


def project_out_in(x: jax.Array, w: jax.Array, config: ProjectionConfig,
                   preferred_element_type: jnp.dtype | None = None) -> jax.Array:
  """x [..., K] times a 2-D [out, in] matrix w [N, K] (e.g. a tied embedding) -> [..., N].

  In the decode layout this is pangu_kernels.skinny_matmul (its CPU kernel for a few rows); in the training
  layout the plain einsum, which autodiff can follow.
  """
  if config.layout == "decode":
    return skinny_matmul(x, prepare_weight(w), preferred_element_type=preferred_element_type)
  return weight_einsum("...k,nk->...n", x, w, preferred_element_type=preferred_element_type)
