"""Decoder-only language model: embedding -> L x (attention, SwiGLU) blocks -> final norm -> logits.

Norm placement per block (Pangu Ultra, arXiv 2504.07866, eq. 1-2):
  pre:      x = x + attn(norm(x));              x = x + mlp(norm(x))
  sandwich: x = x + norm_post(attn(norm(x)));   x = x + norm_post(mlp(norm(x)))
The post-norms normalise the sublayer output before the residual add; in `depth_scaled_sandwich` their
gains start at c/sqrt(L).

The feed-forward is the dense SwiGLU or GELU MLP (`mlp`) or, with `config.moe`, the sparse `MoEFeedForward`
(`moe`), whose losses and load metrics go to the `moe` collection (apply with `mutable=[MOE_COLLECTION]` to read
them). With `config.mole`, lookup experts (`mole`) read the embedding output beside the dense `mlp`; in their
lookup form the layers read table rows fetched once per call from wherever the table lives (pangu.nn.mole).

A uniform model scans one block over a stacked `layers` axis; a non-uniform one (per-layer widths after
pruning, or first-k-dense layers before MoE ones) unrolls. `stack_layers` / `unstack_layers` convert between
the two param layouts.

`extend` runs the same layers over new tokens appended to a `KVCache` (prefill and decode steps); the cache
follows the param layout: one stacked (keys, values) pair carried through the scan, or one pair per layer.
"""

import functools

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from pangu.models.config import TransformerConfig
from pangu.nn import init as inits
from pangu.nn import linear
from pangu.nn.attention import Attention, LayerKV, causal_mask
from pangu.nn.mlp import MLP
from pangu.nn.mole import LookupExperts, StoredTable, TableShape, lookup_rows
from pangu.nn.moe import MOE_COLLECTION, MoEFeedForward
from pangu.nn.norms import RMSNorm, depth_scaled_gain
from pangu.parallel import rules

LAYERS_KEY = "layers"


def _post_gains(cfg: TransformerConfig) -> tuple[float, float]:
  if cfg.norm_placement == "depth_scaled_sandwich":
    return (depth_scaled_gain(cfg.post_gain_attn, cfg.n_layers), depth_scaled_gain(cfg.post_gain_mlp, cfg.n_layers))
  return 1.0, 1.0


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer in preallocated slots; the layout is documented in pangu.infer.kv_cache.

  Attributes:
    layers: a scanned model's one (keys, values) pair, each [L, B, K, T_max, Dh], or an unrolled model's
      tuple of L pairs of [B, K_l, T_max, Dh].
    length: int32 [], slots written so far (the same for every row).
    start: int32 [B], first real slot of each row; slots before it are left padding, and a token in slot t
      has position t - start.
  """

  layers: LayerKV | tuple[LayerKV, ...]
  length: jax.Array
  start: jax.Array

  @property
  def max_length(self) -> int:
    return jax.tree.leaves(self.layers)[0].shape[-2]


class DecoderBlock(nn.Module):
  """One decoder layer. Called as a scan body, so it returns (carry, the layer's updated KV cache or None)."""

  config: TransformerConfig
  layer_index: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache_index: jax.Array | None = None,
               kv_cache: LayerKV | None = None, expert_input: jax.Array | None = None):
    cfg = self.config
    shape = cfg.layer(self.layer_index)
    sandwich = cfg.norm_placement != "pre"
    gain_attn, gain_mlp = _post_gains(cfg)

    h, kv_cache = Attention(cfg, shape.n_heads, shape.n_kv_heads, name="attn")(
        RMSNorm(cfg.norm_eps, name="pre_attn_norm")(x), positions, mask, kv_cache, cache_index)
    if sandwich:
      h = RMSNorm(cfg.norm_eps, gain_init=gain_attn, name="post_attn_norm")(h)
    x = x + h
    u = RMSNorm(cfg.norm_eps, name="pre_mlp_norm")(x)
    kernel_inits = dict(kernel_init=inits.kernel_init(cfg), output_init=inits.kernel_init(cfg, residual_output=True),
                        dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    if cfg.is_moe_layer(self.layer_index):
      h = MoEFeedForward(cfg.moe, cfg.d_model, **kernel_inits, name="moe")(u)
    else:
      h = MLP(cfg, shape.d_ff, name="mlp")(u)
    if cfg.mole is not None:
      h = h + LookupExperts(cfg.mole, cfg.d_model, cfg.norm_eps, **kernel_inits, name="mole")(u, expert_input)
    if sandwich:
      h = RMSNorm(cfg.norm_eps, gain_init=gain_mlp, name="post_mlp_norm")(h)
    x = x + h
    return rules.constrain(x, (rules.BATCH, rules.LENGTH, rules.ACT_EMBED)), kv_cache


def _remat(block_cls, remat: str):
  if remat == "none":
    return block_cls
  policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "selective"
            else jax.checkpoint_policies.nothing_saveable)
  return nn.remat(block_cls, policy=policy, prevent_cse=False)


class Decoder(nn.Module):
  """tokens [B, S] int32 -> logits [B, S, V] float32."""

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(inits.embedding_init(cfg), (rules.VOCAB, rules.EMBED)),
        (cfg.vocab_size, cfg.d_model), jnp.dtype(cfg.param_dtype))
    block = _remat(DecoderBlock, cfg.remat)
    if cfg.scanned:
      per_layer_expert_input = cfg.mole is not None and cfg.mole.lookup
      self.blocks = nn.scan(
          block, variable_axes={"params": 0, MOE_COLLECTION: 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0 if per_layer_expert_input else nn.broadcast),
          length=cfg.n_layers,
          metadata_params={nn.PARTITION_NAME: rules.LAYERS})(cfg, name=LAYERS_KEY)
    else:
      self.blocks = [block(cfg, i, name=f"layer_{i}") for i in range(cfg.n_layers)]
    if cfg.mole is not None and cfg.mole.lookup and cfg.mole.table_storage in ("device", "host"):
      self.mole_table = StoredTable(mole_table_shape(cfg), cfg.mole.table_format)
    self.final_norm = RMSNorm(cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.lm_head = linear.kernel(self, cfg, "lm_head", (cfg.d_model,), (cfg.vocab_size,), (rules.EMBED,),
                                   (rules.VOCAB,), inits.kernel_init(cfg))

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, S] int, got shape {tokens.shape}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = self._embed(tokens)
    x, _ = self._layers(x, positions, causal_mask(positions, positions), expert_input=self._expert_input(tokens, x))
    return self._logits(x)

  def extend(self, tokens: jax.Array, cache: KVCache, last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """Appends tokens [B, S] to the cache: prefill when it is empty, one decode step when S = 1.

    Returns logits [B, S, V] float32 ([B, 1, V] for the last token only with `last_only`, which spares the
    vocab projection of every prompt token) and the cache with S more slots written.
    """
    b, s = tokens.shape
    chex.assert_shape(cache.start, (b,))
    slots = jnp.arange(cache.max_length, dtype=jnp.int32)
    positions = cache.length + jnp.arange(s, dtype=jnp.int32)[None, :] - cache.start[:, None]
    kv_positions = slots[None, :] - cache.start[:, None]
    mask = causal_mask(positions, kv_positions, kv_positions >= 0)
    x = self._embed(tokens)
    x, layers = self._layers(x, positions, mask, cache.length, cache.layers, self._expert_input(tokens, x))
    if last_only:
      x = x[:, -1:]
    return self._logits(x), cache.replace(layers=layers, length=cache.length + s)

  def _embed(self, tokens: jax.Array) -> jax.Array:
    # Gather from a table replicated over the vocab axis: a gather from a vocab-sharded table would force
    # the partitioner to rematerialise it anyway, with a warning.
    table = rules.constrain(self.embedding, (None, rules.ACT_EMBED))
    x = jnp.take(table, tokens, axis=0).astype(self.config.dtype)
    return rules.constrain(x, (rules.BATCH, rules.LENGTH, rules.ACT_EMBED))

  def _expert_input(self, tokens: jax.Array, x: jax.Array) -> jax.Array | None:
    """What MoLE experts read: the embedding output (training form) or table rows [L, B, S, N, D] (lookup)."""
    mole = self.config.mole
    if mole is None:
      return None
    if not mole.lookup:
      return x
    table = self.mole_table() if mole.table_storage in ("device", "host") else None
    rows = lookup_rows(mole, mole_table_shape(self.config), table, tokens, self.config.dtype)
    return jnp.moveaxis(rows, 2, 0)

  def _layers(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache_index: jax.Array | None = None,
              kv: LayerKV | tuple[LayerKV, ...] | None = None, expert_input: jax.Array | None = None):
    cfg = self.config
    if cfg.scanned:
      return self.blocks(x, positions, mask, cache_index, kv, expert_input)
    per_layer = cfg.mole is not None and cfg.mole.lookup
    new_kv = []
    for i, block in enumerate(self.blocks):
      layer_input = expert_input[i] if per_layer else expert_input
      x, layer_kv = block(x, positions, mask, cache_index, None if kv is None else kv[i], layer_input)
      new_kv.append(layer_kv)
    return x, None if kv is None else tuple(new_kv)

  def _logits(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    x = self.final_norm(x)
    if cfg.tie_embeddings:  # the embedding [V, D] is an [out, in] kernel in either layout
      logits = linear.project_out_in(x, self.embedding.astype(cfg.dtype), cfg, preferred_element_type=jnp.float32)
    else:
      logits = linear.project(x, self.lm_head, cfg, preferred_element_type=jnp.float32)
    return rules.constrain(logits, (rules.BATCH, rules.LENGTH, rules.ACT_VOCAB))


def mole_table_shape(config: TransformerConfig) -> TableShape:
  """The geometry of a MoLE model's lookup table: V rows of L x N vectors of width D."""
  return TableShape(config.vocab_size, config.n_layers, config.mole.num_experts, config.d_model)


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: TransformerConfig, rng: jax.Array) -> dict:
  """Unboxed float params (no logical metadata); use `abstract_params` for the partition specs."""
  return nn.unbox(Decoder(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"])


def abstract_params(config: TransformerConfig) -> dict:
  """Boxed ShapeDtypeStructs with logical axis names, computed without allocating (works for 135B)."""
  return jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


@functools.partial(jax.jit, static_argnums=0)
def forward(config: TransformerConfig, params: dict, tokens: jax.Array) -> jax.Array:
  """The one public entry point for a decoder: [B, S] int32 -> [B, S, V] float32 logits."""
  return Decoder(config).apply({"params": params}, tokens)


@functools.partial(jax.jit, static_argnums=0, static_argnames="last_only")
def extend(config: TransformerConfig, params: dict, tokens: jax.Array, cache: KVCache, *,
           last_only: bool = False) -> tuple[jax.Array, KVCache]:
  """Runs tokens [B, S] after the cached ones (see `Decoder.extend`): (logits, updated cache)."""
  return Decoder(config).apply({"params": params}, tokens, cache, last_only, method=Decoder.extend)


def stack_layers(params: dict, n_layers: int) -> dict:
  """Unrolled layout (layer_0..layer_{L-1}) -> scanned layout (one `layers` subtree, leading axis L)."""
  layers = [params[f"layer_{i}"] for i in range(n_layers)]
  rest = {k: v for k, v in params.items() if not k.startswith("layer_")}
  return {**rest, LAYERS_KEY: jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params: dict, n_layers: int) -> dict:
  """Scanned layout -> unrolled layout."""
  rest = {k: v for k, v in params.items() if k != LAYERS_KEY}
  return {**rest, **{f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], params[LAYERS_KEY]) for i in range(n_layers)}}


def layer_params(config: TransformerConfig, params: dict, i: int) -> dict:
  """The params of layer i in either layout."""
  if config.scanned:
    return jax.tree.map(lambda x: x[i], params[LAYERS_KEY])
  return params[f"layer_{i}"]


def cross_entropy_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None,
                       *, z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """Mean next-token cross entropy over unmasked positions, plus z_loss * mean(logsumexp^2) (PaLM).

  Returns (total loss, {"ce": ..., "z_loss": ..., "tokens": ...}).
  """
  logits = logits.astype(jnp.float32)
  if mask is None:
    mask = jnp.ones(targets.shape, jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  tokens = jnp.maximum(mask.sum(), 1.0)
  ce = ((log_z - target_logit) * mask).sum() / tokens
  zl = (jnp.square(log_z) * mask).sum() / tokens
  return ce + z_loss * zl, {"ce": ce, "z_loss": zl, "tokens": mask.sum()}

