"""Calibration activations: each decoder layer run on its own over the inputs that the layers before it produce.

SlimLLM prunes sequentially (spec 3.2): layer l is scored and recovered on the activations of the already pruned
layers 0..l-1, so its recovery fits the inputs it will really see. The pipeline therefore keeps the calibration
hidden states of one depth at a time, as a list of [B, S, D] batches, and runs one `DecoderBlock` over them,
optionally capturing what the scores need: the attention heads before the output projection and the FFN input and
hidden channels (sown by pangu.nn.attention / pangu.nn.mlp into `intermediates`).

Calibration tokens are whole sequences (no padding), so every token counts in every statistic.
"""

import functools
from collections.abc import Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pangu.models.config import TransformerConfig
from pangu.models.transformer import DecoderBlock
from pangu.nn.attention import AttentionMask


@flax.struct.dataclass
class LayerActivations:
  """One batch of a layer's internals, token-major (n = B * S tokens).

  Attributes:
    heads: [n, H, Dh] attention output before the output projection `o`.
    ffn_input: [n, D] the FFN input (after its RMSNorm).
    hidden: [n, F] the FFN channels before `down`.
  """

  heads: jax.Array
  ffn_input: jax.Array
  hidden: jax.Array


def layer_config(config: TransformerConfig, layer: int) -> TransformerConfig:
  """A config whose only shape is `layer`'s, so one compiled block serves every layer of that shape."""
  shape = config.layer(layer)
  return config.replace(layer_shapes=None, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads, d_ff=shape.d_ff)


def _capture(module, method: str) -> bool:
  return module.name == "pre_mlp_norm" and method == "__call__"


@functools.partial(jax.jit, static_argnums=0)
def _block(config: TransformerConfig, params: dict, x: jax.Array) -> tuple[jax.Array, LayerActivations]:
  """The layer's output and internals. One compiled program per layer shape serves both uses: the internals are
  computed on the way anyway, and a second, capture-free variant would double the compile time, which dominates
  at calibration sizes."""
  positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
  (y, _), state = DecoderBlock(config).apply({"params": params}, x, AttentionMask.self_attention(positions),
                                             capture_intermediates=_capture, mutable=["intermediates"])
  found = state["intermediates"]
  tokens = lambda a: a.reshape(-1, *a.shape[2:])
  return y, LayerActivations(heads=tokens(found["attn"]["heads"][0]),
                             ffn_input=tokens(found["pre_mlp_norm"]["__call__"][0]),
                             hidden=tokens(found["mlp"]["hidden"][0]))


def embed(config: TransformerConfig, params: dict, tokens: np.ndarray, batch_size: int) -> list[jax.Array]:
  """The first layer's inputs: the embedding rows of tokens [N, S], in batches of `batch_size` sequences."""
  table = params["embedding"]
  return [jnp.take(table, jnp.asarray(tokens[i:i + batch_size]), axis=0).astype(config.dtype)
          for i in range(0, len(tokens), batch_size)]


def run_layer(config: TransformerConfig, params: dict, layer: int, inputs: list[jax.Array]) -> list[jax.Array]:
  """Layer `layer`'s outputs on each input batch (params: the unrolled model's)."""
  cfg, layer_params = layer_config(config, layer), params[f"layer_{layer}"]
  return [_block(cfg, layer_params, x)[0] for x in inputs]


def capture_layer(config: TransformerConfig, params: dict, layer: int,
                  inputs: list[jax.Array]) -> Iterator[LayerActivations]:
  """Layer `layer`'s internals, one input batch at a time (streamed: only one batch is alive at once)."""
  cfg, layer_params = layer_config(config, layer), params[f"layer_{layer}"]
  for x in inputs:
    yield _block(cfg, layer_params, x)[1]


@jax.jit
def _cosine_sum(x: jax.Array, y: jax.Array) -> jax.Array:
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  norms = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)
  return jnp.sum(jnp.sum(x * y, axis=-1) / jnp.maximum(norms, 1e-12))


def layer_similarities(config: TransformerConfig, params: dict, inputs: list[jax.Array]) -> np.ndarray:
  """[L] mean over calibration tokens of cos(layer input, layer output) on the residual stream, every layer
  fed by the one before (SlimLLM's layer importance, spec 3.1; ShortGPT's Block Influence is 1 minus it)."""
  tokens = sum(x.shape[0] * x.shape[1] for x in inputs)
  out = []
  for layer in range(config.n_layers):
    outputs = run_layer(config, params, layer, inputs)
    out.append(sum(float(_cosine_sum(x, y)) for x, y in zip(inputs, outputs)) / tokens)
    inputs = outputs
  return np.asarray(out)
