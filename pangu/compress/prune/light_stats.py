"""Pangu Light's calibration statistics, all from one pass of the unpruned model (spec 3.0 and 3.2).

Minitron-style activation importances (the paper says only "activation-based"), summed over calibration batches:
  hidden channel k:  sum over every hidden-dim RMSNorm output (all layers, the final norm) of |n(x)_k|
  query head j:      sum over sequences of ||head_j output before o||_2 over positions x Dh
  FFN neuron i:      sum over sequences of ||act(x W_gate) * (x W_up)||_2 over positions
  layer l:           Block Influence 1 - mean_tokens cos(x_in, x_out)
and, for sandwich-norm models, the sums that fit each post-norm's absorption constant (light_reinit.AbsorbStats).
The model runs whole (embedding to final norm) with its norms, attention, FFN and layers captured as Flax
`intermediates`; the statistics reduce inside the jitted pass, so only [L, H]-sized sums leave it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pangu.compress.prune.light_reinit import AbsorbStats
from pangu.models.config import TransformerConfig
from pangu.models.transformer import Decoder

_NORMS = ("pre_attn_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm")
POST_NORMS = {"attn": "post_attn_norm", "mlp": "post_mlp_norm"}


@dataclasses.dataclass(frozen=True)
class LightStats:
  """Importances (higher = keep) and absorption sums of an unrolled model.

  Attributes:
    hidden: [D] hidden-channel importance.
    heads: [L, H] query-head importance.
    ffn: [L, F] FFN-neuron importance.
    block_influence: [L] 1 - mean cosine of each layer's input and output.
    absorb: {(layer, "attn" | "mlp"): AbsorbStats} for the post-norms of a sandwich model, else empty.
  """

  hidden: np.ndarray
  heads: np.ndarray
  ffn: np.ndarray
  block_influence: np.ndarray
  absorb: dict

  def groups(self, layer: int, n_kv_heads: int) -> np.ndarray:
    """[K] KV-group importance of `layer`: the sum over its query heads."""
    return self.heads[layer].reshape(n_kv_heads, -1).sum(axis=1)


def _captured(module, method: str) -> bool:
  name = module.name or ""
  return method == "__call__" and (name in _NORMS or name in ("final_norm", "attn", "mlp")
                                   or name.startswith("layer_"))


def _first(value):
  """A captured value: the first call's output, and of an (output, cache) pair the output."""
  while isinstance(value, tuple):
    value = value[0]
  return value


@functools.partial(jax.jit, static_argnums=0)
def _batch_sums(config: TransformerConfig, params: dict, tokens: jax.Array) -> dict:
  """One calibration batch's sums (float32); the caller adds batches in float64."""
  _, state = Decoder(config).apply({"params": params}, tokens, capture_intermediates=_captured,
                                   mutable=["intermediates"])
  found = state["intermediates"]
  f32 = lambda a: _first(a).astype(jnp.float32)
  x_in = jnp.take(params["embedding"], tokens, axis=0).astype(jnp.float32)
  hidden = jnp.sum(jnp.abs(f32(found["final_norm"]["__call__"])), axis=(0, 1))
  heads, ffn, cosine, absorb = [], [], [], []
  for i in range(config.n_layers):
    layer = found[f"layer_{i}"]
    for name in _NORMS:
      if name in layer:
        hidden = hidden + jnp.sum(jnp.abs(f32(layer[name]["__call__"])), axis=(0, 1))
    heads.append(jnp.sum(jnp.sqrt(jnp.sum(jnp.square(f32(layer["attn"]["heads"])), axis=(1, 3))), axis=0))
    ffn.append(jnp.sum(jnp.sqrt(jnp.sum(jnp.square(f32(layer["mlp"]["hidden"])), axis=1)), axis=0))
    x_out = f32(layer["__call__"])
    norms = jnp.linalg.norm(x_in, axis=-1) * jnp.linalg.norm(x_out, axis=-1)
    cosine.append(jnp.sum(jnp.sum(x_in * x_out, axis=-1) / jnp.maximum(norms, 1e-12)))
    x_in = x_out
    if config.norm_placement != "pre":
      for sub, norm in POST_NORMS.items():
        z = f32(layer[sub]["__call__"])
        r = jnp.sqrt(jnp.mean(jnp.square(z), axis=-1) + config.norm_eps)
        a2 = jnp.sum(jnp.square(params[f"layer_{i}"][norm]["scale"] * z), axis=-1)
        absorb.append(jnp.stack([jnp.sum(a2 / r), jnp.sum(a2), jnp.sum(1 / r), jnp.sum(r), jnp.sum(r * r)]))
  return {"hidden": hidden, "heads": jnp.stack(heads), "ffn": jnp.stack(ffn), "cosine": jnp.stack(cosine),
          "absorb": jnp.stack(absorb) if absorb else jnp.zeros((0, 5))}


def collect_light_stats(config: TransformerConfig, params: dict, tokens: np.ndarray, batch_size: int) -> LightStats:
  """Statistics of an unrolled model (pangu.compress.prune.surgery.unrolled) over calibration tokens [N, S]."""
  config = config.replace(remat="none")
  total = None
  for start in range(0, len(tokens), batch_size):
    sums = jax.device_get(_batch_sums(config, params, jnp.asarray(tokens[start:start + batch_size])))
    sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
    total = sums if total is None else {k: total[k] + v for k, v in sums.items()}
  count = int(tokens.shape[0] * tokens.shape[1])
  absorb = {}
  if config.norm_placement != "pre":
    rows = iter(total["absorb"])
    for i in range(config.n_layers):
      for sub in POST_NORMS:
        absorb[(i, sub)] = AbsorbStats(*(float(v) for v in next(rows)), count)
  return LightStats(hidden=total["hidden"], heads=total["heads"], ffn=total["ffn"],
                    block_influence=1 - total["cosine"] / count, absorb=absorb)


def random_importance(stats: LightStats, seed: int) -> LightStats:
  """`stats` with every importance (hidden channels, heads, FFN neurons, Block Influence) replaced by seeded uniform
  noise: the random-selection lower bound of the spec's ablation. The absorption sums are not importances and stay."""
  rng = np.random.default_rng(seed)
  return dataclasses.replace(stats, hidden=rng.random(stats.hidden.shape), heads=rng.random(stats.heads.shape),
                             ffn=rng.random(stats.ffn.shape), block_influence=rng.random(stats.block_influence.shape))
