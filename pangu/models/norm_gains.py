"""Per-layer statistics of the RMSNorm gains.

Pangu Ultra's Fig. 10 reads the trained gains of the four norms of each layer (pre / post, attention / MLP):
all shrink over training, and the post-norm gains' mean and std grow with depth. These statistics are what a
probe records during training to compare against it.
"""

import numpy as np

LAYER_NORMS = ("pre_attn_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm")


def norm_gain_stats(params: dict) -> dict[str, dict[str, list[float]]]:
  """{norm: {"mean": [L], "std": [L]}}: each layer's mean and std over the channels of its gain vector, for
  every norm of LAYER_NORMS the stacked layers carry (Pre-LN has only the two pre-norms)."""
  layers = params.get("layers")
  if not isinstance(layers, dict):
    raise ValueError("norm_gain_stats: params have no stacked 'layers' (expected the decoder's scanned layers)")
  stats = {}
  for name in LAYER_NORMS:
    if name in layers:
      scale = np.asarray(layers[name]["scale"], np.float64)
      if scale.ndim != 2:
        raise ValueError(f"norm_gain_stats: layers/{name}/scale has shape {scale.shape}, expected [layers, d_model]")
      stats[name] = {"mean": scale.mean(axis=1).tolist(), "std": scale.std(axis=1).tolist()}
  return stats
