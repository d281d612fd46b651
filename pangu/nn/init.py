"""Weight initialisers of Pangu Ultra (arXiv 2504.07866, section 2.2).

TinyInit draws every kernel from N(0, 1/(2 D L)), so each of the 2L residual branches starts with a variance
that shrinks with depth; the "small init" baseline scales only the residual-output projections by 1/sqrt(L).
"""

import math

import jax

from pangu.models.config import TransformerConfig

Initializer = jax.nn.initializers.Initializer

HF_DEFAULT_STD = 0.02


def kernel_std(config: TransformerConfig, *, residual_output: bool) -> float:
  """Std of a projection kernel; `residual_output` marks the attention `o` and FFN `down` projections."""
  d, n_layers = config.d_model, config.n_layers
  if config.init == "tiny":
    return math.sqrt(1.0 / (2 * d * n_layers))
  if config.init == "small":
    return math.sqrt(2.0 / (5 * d * (n_layers if residual_output else 1)))
  return HF_DEFAULT_STD


def embedding_std(config: TransformerConfig) -> float:
  if config.embed_init_std is not None:
    return config.embed_init_std
  if config.init == "tiny":
    return 0.5
  if config.init == "small":
    return math.sqrt(2.0 / (5 * config.d_model))
  return HF_DEFAULT_STD


def kernel_init(config: TransformerConfig, *, residual_output: bool = False) -> Initializer:
  return jax.nn.initializers.normal(kernel_std(config, residual_output=residual_output))


def embedding_init(config: TransformerConfig) -> Initializer:
  return jax.nn.initializers.normal(embedding_std(config))
