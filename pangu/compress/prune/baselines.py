"""Baseline structured-pruning criteria, run through the same sequential pipeline as SlimLLM.

Each criterion scores the units SlimLLM removes (heads or KV groups, FFN channels; higher = keep), so that the
pipeline, the per-layer ratios and the surgery are shared and only the criterion differs (spec section 4):

  magnitude: the L2 norm of a head's W_O block / of a channel's gate, up and down weights.
  wanda_sp:  structured Wanda (Sun et al., ICLR 2024; the -sp variant of An et al., FLAP, AAAI 2024): sum over the
             output projection's input channels j of the unit of |W_jd| * ||X_j||_2.
  flap:      FLAP's fluctuation metric (An et al., AAAI 2024): Var_tokens(X_j) * ||W_j,:||^2 summed over the unit's
             input channels; its bias compensation is the `mean_shift` recovery. FLAP's cross-layer standardised
             global ranking is replaced by the shared per-layer ratios.
  taylor:    LLM-Pruner's first-order importance (Ma et al., NeurIPS 2023; element-wise `param_first`, summed over
             the group): sum |w * dL/dw| over every weight of the unit, gradients of the LM loss on the calibration
             tokens, taken once on the unpruned model as LLM-Pruner does.
  layer_drop: ShortGPT's block removal (Men et al., 2024): whole layers with the lowest Block Influence
             1 - cos(input, output) go.

X above is the input of the output projection: the heads before `o` (attention) or the FFN channels before `down`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pangu.compress.prune.ratios import layer_param_count, non_embedding_params
from pangu.compress.prune.surgery import HeadUnits
from pangu.models.config import TransformerConfig
from pangu.models.transformer import Decoder, cross_entropy_loss


def _f64(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def magnitude_heads(attn: dict, units: HeadUnits) -> np.ndarray:
  """[U] ||W_O||_F over the unit's heads."""
  return np.sqrt(units.membership @ np.sum(_f64(attn["o"]) ** 2, axis=(1, 2)))


def magnitude_channels(mlp: dict) -> np.ndarray:
  """[F] sqrt(||W_gate[:, j]||^2 + ||W_up[:, j]||^2 + ||W_down[j, :]||^2)."""
  squares = np.sum(_f64(mlp["down"]) ** 2, axis=1)
  for name in ("gate", "up"):
    if name in mlp:
      squares = squares + np.sum(_f64(mlp[name]) ** 2, axis=0)
  return np.sqrt(squares)


def wanda_heads(attn: dict, channel_sq: np.ndarray, units: HeadUnits) -> np.ndarray:
  """[U] sum over the unit's head channels c and outputs d of |W_O[h, c, d]| * ||X_{h,c}||; channel_sq [H, Dh] is
  the sum over tokens of X_{h,c}^2."""
  return units.membership @ np.einsum("hcd,hc->h", np.abs(_f64(attn["o"])), np.sqrt(channel_sq))


def wanda_channels(mlp: dict, hidden_sq: np.ndarray) -> np.ndarray:
  """[F] sum_d |W_down[j, d]| * ||h_j||."""
  return np.abs(_f64(mlp["down"])).sum(axis=1) * np.sqrt(hidden_sq)


def flap_heads(attn: dict, channel_var: np.ndarray, units: HeadUnits) -> np.ndarray:
  """[U] sum over the unit's head channels of Var(X_{h,c}) * ||W_O[h, c, :]||^2."""
  return units.membership @ np.einsum("hc,hc->h", channel_var, np.sum(_f64(attn["o"]) ** 2, axis=2))


def flap_channels(mlp: dict, hidden_var: np.ndarray) -> np.ndarray:
  """[F] Var(h_j) * ||W_down[j, :]||^2."""
  return hidden_var * np.sum(_f64(mlp["down"]) ** 2, axis=1)


def _salience(params: dict, grads: dict, name: str, keep_axis: int) -> np.ndarray:
  """sum of |w * g| of params[name] over every axis but `keep_axis` (zeros when the leaf is absent)."""
  if name not in params:
    return 0.0
  value = np.abs(_f64(params[name]) * _f64(grads[name]))
  return value.sum(axis=tuple(a for a in range(value.ndim) if a != keep_axis))


def taylor_heads(attn: dict, grads: dict, units: HeadUnits) -> np.ndarray:
  """[U] sum of |w * dL/dw| over the unit's q and o slices (and biases), plus its K/V heads when they go too."""
  per_head = _salience(attn, grads, "q", 1) + _salience(attn, grads, "o", 0) + _salience(attn, grads, "q_bias", 0)
  score = units.membership @ per_head
  if units.removes_kv:  # units are the KV groups, in order
    score = score + sum(_salience(attn, grads, name, axis) for name, axis in (
        ("k", 1), ("v", 1), ("k_bias", 0), ("v_bias", 0)))
  return score


def taylor_channels(mlp: dict, grads: dict) -> np.ndarray:
  """[F] sum of |w * dL/dw| over gate[:, j], up[:, j], down[j, :] and the channel's biases."""
  return (_salience(mlp, grads, "down", 0) + sum(_salience(mlp, grads, name, 1) for name in ("gate", "up"))
          + sum(_salience(mlp, grads, name, 0) for name in ("gate_bias", "up_bias")))


@functools.partial(jax.jit, static_argnums=0)
def _loss_gradient(config: TransformerConfig, params: dict, tokens: jax.Array) -> dict:
  def loss(p):
    logits = Decoder(config).apply({"params": p}, tokens[:, :-1])
    return cross_entropy_loss(logits, tokens[:, 1:])[0]
  return jax.grad(loss)(params)


def lm_loss_gradients(config: TransformerConfig, params: dict, tokens: np.ndarray, batch_size: int) -> dict:
  """Gradient of the mean next-token cross entropy over every calibration sequence [N, S] (batched)."""
  total = None
  for i in range(0, len(tokens), batch_size):
    batch = jnp.asarray(tokens[i:i + batch_size])
    grads = jax.tree.map(lambda g, n=len(batch): g * (n / len(tokens)), _loss_gradient(config, params, batch))
    total = grads if total is None else jax.tree.map(jnp.add, total, grads)
  return total


def layers_to_drop(config: TransformerConfig, similarities: np.ndarray, ratio: float) -> list[int]:
  """The most input/output-similar layers whose removal brings the non-embedding parameter count nearest
  (1 - ratio) of the model's; at least one layer stays."""
  target = ratio * non_embedding_params(config)
  order = np.argsort(-np.asarray(similarities), kind="stable")
  removed, best, best_count = 0, abs(target), 0
  for count, layer in enumerate(order[:-1], start=1):
    removed += layer_param_count(config, config.layer(int(layer)))
    if abs(target - removed) < best:
      best, best_count = abs(target - removed), count
  return sorted(int(i) for i in order[:best_count])
