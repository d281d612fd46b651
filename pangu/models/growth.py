"""Function-preserving depth growth: a trained shallow decoder placed inside a deeper one.

The new layers are freshly initialised except their attention and MLP output projections, which are zero: with
pre-norm residual blocks such a layer adds nothing to the residual stream, so the grown model computes exactly the
shallow model's function, and further training can start from it (the new layers' outputs get gradients at once).
"""

import jax
import numpy as np

from pangu.models.config import TransformerConfig
from pangu.models.transformer import init_params

OUTPUT_PROJECTIONS = ("o", "down")  # the kernels whose output is added to the residual stream


def grow_depth(config: TransformerConfig, params: dict, n_layers: int, at: tuple[int, ...],
               rng: jax.Array) -> tuple[TransformerConfig, dict]:
  """(config, params) of an n_layers model computing the same function as (config, params): trained layer i goes
  to depth at[i]; every other layer is an identity (zero output projections, the rest initialised from rng)."""
  if not config.scanned or config.norm_placement != "pre":
    raise ValueError(f"grow_depth needs a uniform scanned pre-norm model, got scan_layers={config.scan_layers}, "
                     f"uniform={config.is_uniform}, norm_placement={config.norm_placement!r}")
  at = tuple(int(a) for a in at)
  if len(at) != config.n_layers or list(at) != sorted(set(at)) or at[0] < 0 or at[-1] >= n_layers:
    raise ValueError(f"grow_depth: at={at} must be {config.n_layers} strictly increasing depths in [0, {n_layers})")
  grown = config.replace(n_layers=n_layers)
  identity = np.ones(n_layers, bool)
  identity[list(at)] = False

  def place(path, fresh, old):
    names = [getattr(k, "key", None) for k in path]
    if names[0] != "layers":
      return np.asarray(old)
    new = np.array(fresh)
    if names[-1] in OUTPUT_PROJECTIONS:
      new[identity] = 0.0
    new[list(at)] = np.asarray(old)
    return new

  fresh = jax.device_get(init_params(grown, rng))
  return grown, jax.tree_util.tree_map_with_path(place, fresh, jax.device_get(params))
