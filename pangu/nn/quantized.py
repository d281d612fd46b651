"""Run-time pieces of post-training quantisation: uniform quantisers, the int8 x int8 -> int32 product, per-step
tables, and `QuantDense`, a dense layer whose quantisation state lives outside its params.

Why a separate variable collection: a quantised or re-parameterised model keeps the float model's params (same
shapes, same checkpoints) and adds a `quant` collection next to them. Each `QuantDense` reads, when present:
  * `bias_table`: a `StepTable` replacing the bias (per-group biases of a re-parameterisation);
  * `input_shift` (a `StepTable`) and `input_scale` [C_in]: smoothing applied on the fly, (x - z_g) / s;
  * `act_range`: a `StepTable` of (min, max) per group: static, per-tensor, asymmetric activation fake-quant;
  * `kernel_int8` [C_in, C_out] int8 and `kernel_scale` [C_out]: the real integer path (needs `act_range`).
`QuantAttention`, the attention core, reads `q_range`, `k_range` and `v_range` (`StepTable`s of (min, max)): with
them both attention matmuls take fake-quantised inputs (the probabilities on a fixed grid over [0, 1]).
Every table is indexed by the sampler's step index, never the diffusion time (classifier-free guidance runs
both halves of a batch at one step). The calibration capture point is `sow("intermediates", "input", x)`: the
tensor the activation quantiser sees.

Bits: weights are symmetric, int8 in [-127, 127], int4 in [-7, 7] (symmetric ranges, so zero is exact and
negation is closed); activations asymmetric in [-2^(b-1), 2^(b-1) - 1] with a zero-point rounded in float.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from pangu.nn import linear
from pangu.nn.attention import AttentionMask, dot_product_attention
from pangu.nn.linear import ProjectionConfig

QUANT = "quant"
Initializer = jax.nn.initializers.Initializer


def select_step(table: dict, step: jax.Array) -> jax.Array:
  """A `StepTable` {"values": [G, ...], "group_of_step": int32 [T]} read at sampler step `step`."""
  return table["values"][table["group_of_step"][step]]


def step_table(values: jax.Array, group_of_step: jax.Array) -> dict:
  return {"values": values, "group_of_step": jnp.asarray(group_of_step, jnp.int32)}


def weight_qmax(bits: int) -> int:
  """Largest level of a symmetric signed weight grid: 127 for int8, 7 for int4."""
  return 2 ** (bits - 1) - 1


def symmetric_scale(w: jax.Array, bits: int, axis: int | tuple[int, ...] | None) -> jax.Array:
  """Step size of a symmetric min-max grid, reduced over `axis` (keepdims; None: one scale per tensor)."""
  amax = jnp.max(jnp.abs(w), axis=axis, keepdims=True)
  return jnp.maximum(amax, 1e-12) / weight_qmax(bits)


def quantise_symmetric(w: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  """Integer levels round(w / scale) clipped to [-qmax, qmax] (kept in float)."""
  q = weight_qmax(bits)
  return jnp.clip(jnp.round(w / scale), -q, q)


def fake_quant_weight(w: jax.Array, bits: int, per_channel: bool = True) -> jax.Array:
  """Round-to-nearest weight, dequantised: per output channel (kernel [C_in, C_out]) or per tensor."""
  scale = symmetric_scale(w, bits, axis=0 if per_channel else None)
  return quantise_symmetric(w, scale, bits) * scale


def activation_params(lo: jax.Array, hi: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """(scale, zero_point) of an asymmetric grid covering [min(lo, 0), max(hi, 0)]; the zero-point is an integer."""
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  levels = 2 ** bits - 1
  scale = jnp.maximum(hi - lo, 1e-8) / levels
  zero = jnp.round(-lo / scale) - 2 ** (bits - 1)
  return scale, zero


def quantise_activation(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """Integer levels clip(round(x / scale) + zero) in [-2^(b-1), 2^(b-1) - 1] (kept in float)."""
  return jnp.clip(jnp.round(x / scale) + zero, -2 ** (bits - 1), 2 ** (bits - 1) - 1)


def fake_quant_activation(x: jax.Array, lo: jax.Array, hi: jax.Array, bits: int) -> jax.Array:
  scale, zero = activation_params(lo, hi, bits)
  return (quantise_activation(x, scale, zero, bits) - zero) * scale


def int8_matmul(x: jax.Array, lo: jax.Array, hi: jax.Array, kernel_int8: jax.Array,
                kernel_scale: jax.Array) -> jax.Array:
  """x [..., C_in] float through a real int8 x int8 -> int32 dot with kernel_int8 [C_in, C_out].

  With x ~ s_x (q_x - z_x) and W ~ q_w diag(s_w): x W = s_x (q_x q_w - z_x 1^T q_w) diag(s_w). The product and the
  zero-point correction are exact integer sums; only the final rescale is float.
  """
  scale, zero = activation_params(lo, hi, 8)
  q_x = quantise_activation(x, scale, zero, 8).astype(jnp.int8)
  acc = jax.lax.dot_general(q_x, kernel_int8, (((q_x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  column_sums = jnp.sum(kernel_int8.astype(jnp.int32), axis=0)
  acc = acc - zero.astype(jnp.int32) * column_sums
  return acc.astype(jnp.float32) * scale * kernel_scale


class QuantDense(nn.Module):
  """x [..., C_in] -> [..., features], kernel [C_in, features] and bias in params; quantisation from `quant`.

  Attributes:
    features: output width.
    in_axis, out_axis: logical axis names of the kernel.
    act_bits: activation bits used when the `quant` collection holds an `act_range`.
    projection: projection policy (training layout only: the re-parameterisation edits [C_in, C_out] rows).
    kernel_init, bias_init: initialisers.
  """

  features: int
  in_axis: str | None
  out_axis: str | None
  act_bits: int = 8
  projection: ProjectionConfig = ProjectionConfig()
  kernel_init: Initializer = jax.nn.initializers.xavier_uniform()
  bias_init: Initializer = jax.nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, step: jax.Array | None = None) -> jax.Array:
    if self.projection.layout != "training":
      raise ValueError("QuantDense supports only the training layout ([C_in, C_out] kernels)")
    w = linear.kernel(self, self.projection, "kernel", (x.shape[-1],), (self.features,), (self.in_axis,),
                      (self.out_axis,), self.kernel_init)
    bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, (self.out_axis,)), (self.features,),
                      jnp.dtype(self.projection.param_dtype))

    def quant(name):
      return self.get_variable(QUANT, name) if self.has_variable(QUANT, name) else None

    def needs_step(name):
      if step is None:
        raise ValueError(f"QuantDense {self.name}: quant table {name!r} is per step, but no step index was given")
      return step

    if (shift := quant("input_shift")) is not None:
      x = (x - select_step(shift, needs_step("input_shift"))) / quant("input_scale")
    self.sow("intermediates", "input", x)
    if (table := quant("bias_table")) is not None:
      bias = select_step(table, needs_step("bias_table"))
    act_range = quant("act_range")
    if act_range is not None:
      lo, hi = select_step(act_range, needs_step("act_range"))
    if (kernel_int8 := quant("kernel_int8")) is not None:
      if act_range is None or self.act_bits != 8:
        raise ValueError(f"QuantDense {self.name}: the int8 path needs an 8-bit act_range")
      return int8_matmul(x, lo, hi, kernel_int8, quant("kernel_scale")) + bias
    if act_range is not None:
      x = fake_quant_activation(x, lo, hi, self.act_bits)
    return linear.project(x, w, self.projection) + bias.astype(self.projection.dtype)


def fake_quant_probabilities(p: jax.Array, bits: int) -> jax.Array:
  """Attention probabilities on the unsigned grid {0, 1, ..., 2^b - 1} / (2^b - 1): they lie in [0, 1], so the
  range needs no calibration (the asymmetric grid over [0, 1])."""
  return fake_quant_activation(p, jnp.float32(0.0), jnp.float32(1.0), bits)


class QuantAttention(nn.Module):
  """Non-causal attention core q, k, v [B, N, A, Dh] -> [B, N, A, Dh], whose matmuls (q k^T and p v) take
  quantised inputs when the `quant` collection holds `q_range`, `k_range` and `v_range`: q, k and v fake-quantised
  on their static per-tensor grids, the softmax probabilities p on [0, 1]. Without them it is
  `dot_product_attention` with `implementation`. Sows q, k and v (calibration capture points).

  Attributes:
    implementation: the float path's attention implementation.
    act_bits: bits of the quantised operands.
  """

  implementation: str = "auto"
  act_bits: int = 8

  @nn.compact
  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, step: jax.Array | None = None) -> jax.Array:
    for name, operand in (("q", q), ("k", k), ("v", v)):
      self.sow("intermediates", name, operand)
    if not self.has_variable(QUANT, "q_range"):
      return dot_product_attention(q, k, v, AttentionMask(causal=False), implementation=self.implementation)
    if step is None:
      raise ValueError(f"QuantAttention {self.name}: its ranges are per step, but no step index was given")
    q, k, v = (fake_quant_activation(x, *select_step(self.get_variable(QUANT, f"{name}_range"), step), self.act_bits)
               for name, x in (("q", q), ("k", k), ("v", v)))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    probabilities = fake_quant_probabilities(jax.nn.softmax(logits, axis=-1), self.act_bits)
    return jnp.einsum("bhqk,bkhd->bqhd", probabilities, v)
