"""Weight initialisers of Pangu Ultra (arXiv 2504.07866, section 2.2).

TinyInit draws every kernel from N(0, 1/(2 D L)), so each of the 2L residual branches starts with a variance
that shrinks with depth; the "small init" baseline scales only the residual-output projections by 1/sqrt(L).
"""

import dataclasses
import math
from typing import Literal

import jax

from pangu.config_checks import one_of, positive_ints

Initializer = jax.nn.initializers.Initializer
InitScheme = Literal["tiny", "small", "normal"]
INIT_SCHEMES = ("tiny", "small", "normal")

HF_DEFAULT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """What the initialisers need to know of the model.

  Attributes:
    scheme: `tiny` (TinyInit, std sqrt(1/(2 D L)) for every kernel), `small` (sqrt(2/(5D)), residual outputs
      sqrt(2/(5DL))) or `normal` (std 0.02, the Hugging Face default).
    d_model: D, the residual width.
    n_layers: L, the depth the variances scale with.
    embed_std: embedding std; None means the scheme's default (0.5 for tiny, as the paper).
  """

  scheme: InitScheme
  d_model: int
  n_layers: int
  embed_std: float | None = None

  def __post_init__(self):
    one_of(self, "scheme", INIT_SCHEMES)
    positive_ints(self, "d_model", "n_layers")
    if self.embed_std is not None and not self.embed_std > 0:
      raise ValueError(f"InitConfig.embed_std must be > 0 or None, got {self.embed_std!r}")


def kernel_std(config: InitConfig, *, residual_output: bool) -> float:
  """Std of a projection kernel; `residual_output` marks the attention `o` and FFN `down` projections."""
  d, n_layers = config.d_model, config.n_layers
  if config.scheme == "tiny":
    return math.sqrt(1.0 / (2 * d * n_layers))
  if config.scheme == "small":
    return math.sqrt(2.0 / (5 * d * (n_layers if residual_output else 1)))
  return HF_DEFAULT_STD


def embedding_std(config: InitConfig) -> float:
  if config.embed_std is not None:
    return config.embed_std
  if config.scheme == "tiny":
    return 0.5
  if config.scheme == "small":
    return math.sqrt(2.0 / (5 * config.d_model))
  return HF_DEFAULT_STD


def kernel_init(config: InitConfig, *, residual_output: bool = False) -> Initializer:
  return jax.nn.initializers.normal(kernel_std(config, residual_output=residual_output))


def embedding_init(config: InitConfig) -> Initializer:
  return jax.nn.initializers.normal(embedding_std(config))
