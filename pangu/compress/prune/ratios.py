"""Per-layer pruning ratios (SlimLLM, spec 3.1) and the parameter accounting that meets a global target.

SlimLLM prunes the layers that change the residual stream least the most: with sim_l the mean cosine similarity
of layer l's input and output, the n_sel most similar layers get r_l = r_0 * n_sel * softmax(alpha * sim_sel)_l
(the form of the official code; its mean over the selected layers is r_0) and the others none. The same r_l
removes round(r_l * H) heads and round(r_l * F) FFN channels.

The caller asks for a fraction of the model's non-embedding parameters, which is what its size and speed follow.
Heads, KV groups and channels are removed in whole units and the recovery may add biases, so r_0 is solved for by
bisection on the exact parameter count of the pruned shapes (closed form, `layer_param_count`) and the count
nearest the target wins. Every ratio is capped at `max_layer_ratio` and every layer keeps at least one head
(group) and one channel.
"""

import numpy as np

from pangu.compress.prune.options import PruneOptions
from pangu.compress.prune.surgery import HeadUnits, head_units
from pangu.models.config import LayerShape, TransformerConfig


def layer_weights(similarities: np.ndarray, alpha: float, n_selected: int) -> np.ndarray:
  """[L] weights w_l with r_l = r_0 w_l: n_sel * softmax(alpha * sim) over the n_sel most similar layers, 0
  elsewhere."""
  similarities = np.asarray(similarities, np.float64)
  selected = np.argsort(-similarities, kind="stable")[:n_selected]
  logits = alpha * similarities[selected]
  soft = np.exp(logits - logits.max())
  weights = np.zeros_like(similarities)
  weights[selected] = n_selected * soft / soft.sum()
  return weights


def units_removed(units: HeadUnits, ratio: float) -> dict[int, int]:
  """Block -> how many of its units go: round(ratio * units in the block), leaving at least one."""
  sizes = np.bincount(units.blocks)
  return {b: min(round(ratio * int(n)), int(n) - 1) for b, n in enumerate(sizes)}


def channels_removed(d_ff: int, ratio: float, exempt_frac: float) -> int:
  """round(ratio * F) channels, leaving the exempt lowest ones and at least one."""
  return max(0, min(round(ratio * d_ff), d_ff - max(1, round(exempt_frac * d_ff))))


def shape_after(shape: LayerShape, ratio: float, options: PruneOptions) -> LayerShape:
  """The layer's shape once `ratio` of its heads (by options.gqa) and FFN channels are removed."""
  units = head_units(shape, options.gqa)
  heads = shape.n_heads - sum(n * len(units.members[0]) for n in units_removed(units, ratio).values())
  kv_heads = heads * shape.n_kv_heads // shape.n_heads if units.removes_kv else shape.n_kv_heads
  return LayerShape(heads, kv_heads, shape.d_ff - channels_removed(shape.d_ff, ratio, options.ffn_exempt_lowest_frac))


def layer_param_count(config: TransformerConfig, shape: LayerShape) -> int:
  """Parameters of one dense decoder layer of `shape` under `config`'s bias, norm and activation options."""
  d, dh, h, k, f = config.d_model, config.head_dim, shape.n_heads, shape.n_kv_heads, shape.d_ff
  norms = (4 if config.norm_placement != "pre" else 2) * d
  attention = 2 * d * dh * (h + k) + config.attention_bias * (h + 2 * k) * dh
  attention += config.attention_output_bias * d + config.qk_norm * 2 * dh
  swiglu = config.mlp_activation == "swiglu"
  mlp = (3 if swiglu else 2) * d * f + config.mlp_bias * ((2 if swiglu else 1) * f + d)
  return norms + attention + mlp


def non_embedding_params(config: TransformerConfig) -> int:
  """Every parameter but the embedding and the LM head: the layers and the final norm."""
  return sum(layer_param_count(config, config.layer(i)) for i in range(config.n_layers)) + config.d_model


def pruned_config(config: TransformerConfig, shapes: list[LayerShape], options: PruneOptions) -> TransformerConfig:
  """`config` with `shapes`, and the biases the recovery adds where heads or channels went (see
  surgery.enable_output_biases)."""
  heads_cut = any(s.n_heads < config.layer(i).n_heads for i, s in enumerate(shapes))
  channels_cut = any(s.d_ff < config.layer(i).d_ff for i, s in enumerate(shapes))
  attention, mlp = options.adds_bias("attn") and heads_cut, options.adds_bias("mlp") and channels_cut
  return config.replace(layer_shapes=tuple(shapes),
                        attention_bias=config.attention_bias or attention,
                        attention_output_bias=config.attention_output_bias or attention,
                        mlp_bias=config.mlp_bias or mlp)


def solve_layer_ratios(config: TransformerConfig, weights: np.ndarray, options: PruneOptions) -> np.ndarray:
  """[L] ratios r_l = min(r_0 w_l, max_layer_ratio) with r_0 such that the pruned model's non-embedding parameter
  count is nearest (1 - options.ratio) times the model's. Raises ValueError if the target is out of reach."""
  weights = np.asarray(weights, np.float64)
  before = non_embedding_params(config)
  target = (1 - options.ratio) * before

  def ratios(r0: float) -> np.ndarray:
    return np.minimum(r0 * weights, options.max_layer_ratio)

  def after(r0: float) -> int:
    shapes = [shape_after(config.layer(i), r, options) for i, r in enumerate(ratios(r0))]
    return non_embedding_params(pruned_config(config, shapes, options))

  if options.ratio == 0 or not weights.any():
    return np.zeros_like(weights)
  lo, hi = 0.0, options.max_layer_ratio / weights[weights > 0].min()
  if after(hi) > target:
    raise ValueError(f"ratio={options.ratio} is out of reach: pruning {int((weights > 0).sum())} of "
                     f"{len(weights)} layers at most max_layer_ratio={options.max_layer_ratio} each removes at most "
                     f"{1 - after(hi) / before:.3f} of the non-embedding parameters")
  for _ in range(60):
    mid = (lo + hi) / 2
    if after(mid) <= target:
      hi = mid
    else:
      lo = mid
  best = min((lo, hi), key=lambda r0: abs(after(r0) - target))
  return ratios(best)
