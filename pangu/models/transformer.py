"""Decoder-only language model: embedding -> L x (attention, SwiGLU) blocks -> final norm -> logits.

Norm placement per block (Pangu Ultra, arXiv 2504.07866, eq. 1-2):
  pre:      x = x + attn(norm(x));              x = x + mlp(norm(x))
  sandwich: x = x + norm_post(attn(norm(x)));   x = x + norm_post(mlp(norm(x)))
The post-norms normalise the sublayer output before the residual add; in `depth_scaled_sandwich` their
gains start at c/sqrt(L).

Attention is GQA (`pangu.nn.attention.Attention`) or, with `config.mla`, multi-head latent attention
(`pangu.nn.mla.MultiHeadLatentAttention`, absorbed over a latent cache when decoding).

The feed-forward is the dense SwiGLU or GELU MLP (`mlp`) or, with `config.moe`, the sparse `MoEFeedForward`
(`moe`), whose losses and load metrics go to the `moe` collection (apply with `mutable=[MOE_COLLECTION]` to read
them). With `config.mole`, lookup experts (`mole`) read the embedding output beside the dense `mlp`; in their
lookup form the layers read table rows fetched once per call from wherever the table lives (pangu.nn.mole).

A uniform model scans one block over a stacked `layers` axis; a non-uniform one (per-layer widths after
pruning, or first-k-dense layers before MoE ones) unrolls. `stack_layers` / `unstack_layers` convert between
the two param layouts.

With `config.mtp_layers`, the decoder also owns one multi-token-prediction block (`mtp_*` params, Pangu Ultra
MoE / DeepSeek-V3 sec. 2.2): `Decoder.mtp_logits` combines the last hidden state h_s with the embedding of token
s+1 as W [norm(h_s); norm(emb(t_{s+1}))], runs one more decoder block of the last layer's kind over the result,
and predicts token s+2 through its own output norm and the shared output head (DeepSeek-V3's `shared_head`:
a norm per MTP module, the head shared). The plain forward never runs it.

`Decoder.run` is the one forward: optionally over a KV cache (one `LayerCache` per layer, stacked for a
scanned model; see pangu.infer.kv_cache) and optionally in stages with a hook between them
(pangu.models.stages). Stages run a scanned model's layers as a `lax.scan` over slices of the stacked params;
that path is for inference and pruning: it neither rematerialises nor collects MoE metrics.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from pangu.models.config import TransformerConfig
from pangu.models.stages import LayerStages, TokenState
from pangu.nn import init as inits
from pangu.nn import linear
from pangu.nn.attention import Attention, AttentionMask, LayerCache
from pangu.nn.mla import MultiHeadLatentAttention
from pangu.nn.mlp import MLP
from pangu.nn.mole import ExpertRows, HotRows, LookupExperts, StoredTable, TableShape, lookup_rows
from pangu.nn.moe import MOE_COLLECTION, MoEFeedForward
from pangu.nn.norms import RMSNorm, depth_scaled_gain
from pangu.parallel import rules

LAYERS_KEY = "layers"
# One layer's cache, a scanned model's stacked caches or an unrolled model's tuple of them.
LayerCaches = LayerCache | tuple[LayerCache, ...]


def _post_gains(cfg: TransformerConfig) -> tuple[float, float]:
  if cfg.norm_placement == "depth_scaled_sandwich":
    return (depth_scaled_gain(cfg.post_gain_attn, cfg.n_layers), depth_scaled_gain(cfg.post_gain_mlp, cfg.n_layers))
  return 1.0, 1.0


class DecoderBlock(nn.Module):
  """One decoder layer. Called as a scan body, so it returns (carry, the layer's updated cache or None)."""

  config: TransformerConfig
  layer_index: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, mask: AttentionMask, cache: LayerCache | None = None,
               expert_input: jax.Array | None = None):
    cfg = self.config
    sandwich = cfg.norm_placement != "pre"
    gain_attn, gain_mlp = _post_gains(cfg)
    init = cfg.init_config
    kernel_inits = dict(kernel_init=inits.kernel_init(init), output_init=inits.kernel_init(init, residual_output=True))

    if cfg.mla is not None:
      attention = MultiHeadLatentAttention(cfg.mla_config(self.layer_index), **kernel_inits, name="attn")
    else:
      attention = Attention(cfg.attention_config(self.layer_index), **kernel_inits, name="attn")
    h, cache = attention(RMSNorm(cfg.norm_eps, name="pre_attn_norm")(x), mask, cache)
    if sandwich:
      h = RMSNorm(cfg.norm_eps, gain_init=gain_attn, name="post_attn_norm")(h)
    x = x + h
    u = RMSNorm(cfg.norm_eps, name="pre_mlp_norm")(x)
    dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    if cfg.is_moe_layer(self.layer_index):
      h = MoEFeedForward(cfg.moe, cfg.d_model, **kernel_inits, **dtypes, name="moe")(u)
    else:
      h = MLP(cfg.mlp_config(self.layer_index), **kernel_inits, name="mlp")(u)
    if cfg.mole is not None:
      h = h + LookupExperts(cfg.mole, cfg.d_model, cfg.norm_eps, **kernel_inits, **dtypes, name="mole")(
          u, expert_input)
    if sandwich:
      h = RMSNorm(cfg.norm_eps, gain_init=gain_mlp, name="post_mlp_norm")(h)
    x = x + h
    return rules.constrain(x, (rules.BATCH, rules.LENGTH, rules.ACT_EMBED)), cache


def _remat(block_cls, remat: str):
  if remat == "none":
    return block_cls
  policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "selective"
            else jax.checkpoint_policies.nothing_saveable)
  return nn.remat(block_cls, policy=policy, prevent_cse=False)


def _kept(per_token: jax.Array | None, state: TokenState, axis: int, stage: int) -> jax.Array | None:
  """The entries of the tokens in `state` along the token axis of `per_token` (an input of the whole call)."""
  if per_token is None or stage == 0:
    return per_token
  if isinstance(per_token, ExpertRows):
    return per_token.replace(index=_kept(per_token.index, state, axis, stage))
  index = state.indices.reshape(*(1,) * (axis - 1), *state.indices.shape, *(1,) * (per_token.ndim - axis - 1))
  return jnp.take_along_axis(per_token, index, axis=axis)


def _slice_layers(caches: LayerCaches | None, first: int, end: int, scanned: bool) -> LayerCaches | None:
  if caches is None:
    return None
  return jax.tree.map(lambda a: a[first:end], caches) if scanned else caches[first:end]


def _join_layers(parts: list, scanned: bool) -> LayerCaches | None:
  if parts[0] is None:
    return None
  if len(parts) == 1:
    return parts[0]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts) if scanned else sum(parts, ())


class Decoder(nn.Module):
  """tokens [B, S] int32 -> logits [B, S, V] float32."""

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(inits.embedding_init(cfg.init_config), (rules.VOCAB, rules.EMBED)),
        (cfg.vocab_size, cfg.d_model), jnp.dtype(cfg.param_dtype))
    block = _remat(DecoderBlock, cfg.remat)
    if cfg.scanned:
      self.blocks = nn.scan(
          block, variable_axes={"params": 0, MOE_COLLECTION: 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, 0, 0 if self._per_layer_expert_input else nn.broadcast),
          length=cfg.n_layers,
          metadata_params={nn.PARTITION_NAME: rules.LAYERS})(cfg, name=LAYERS_KEY)
    else:
      self.blocks = [block(cfg, i, name=f"layer_{i}") for i in range(cfg.n_layers)]
    if cfg.mole is not None and cfg.mole.lookup and cfg.mole.table_storage in ("device", "host"):
      self.mole_table = StoredTable(mole_table_shape(cfg), cfg.mole.table_format)
    if cfg.mole is not None and cfg.mole.hot_rows:
      self.mole_hot_rows = HotRows(mole_table_shape(cfg), cfg.mole.table_format, cfg.mole.hot_rows)
    self.final_norm = RMSNorm(cfg.norm_eps)
    if cfg.mtp_layers:
      self.mtp_hidden_norm = RMSNorm(cfg.norm_eps)
      self.mtp_embed_norm = RMSNorm(cfg.norm_eps)
      self.mtp_proj = linear.kernel(self, cfg.projection, "mtp_proj", (2 * cfg.d_model,), (cfg.d_model,),
                                    (None,), (rules.EMBED,), inits.kernel_init(cfg.init_config))
      self.mtp_block = _remat(DecoderBlock, cfg.remat)(cfg, cfg.n_layers - 1)
      self.mtp_head_norm = RMSNorm(cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.lm_head = linear.kernel(self, cfg.projection, "lm_head", (cfg.d_model,), (cfg.vocab_size,),
                                   (rules.EMBED,), (rules.VOCAB,), inits.kernel_init(cfg.init_config))

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Logits [B, S, V] of tokens [B, S] at `positions` (default 0..S-1), attending only within their
    `segment_ids` (packed sequences) when given."""
    logits, _, state = self.run(tokens, positions, segment_ids=segment_ids)
    if self.config.mtp_layers and self.is_initializing():  # create the MTP params with the rest
      self.mtp_logits(state.x, tokens, positions, segment_ids)
    return logits

  def mtp_logits(self, hidden: jax.Array, next_tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
    """The MTP block's logits [B, S, V]: from the last hidden states hidden [B, S, D] (before the final norm,
    `TokenState.x` of `run`) and the tokens that follow them next_tokens [B, S], the token after those."""
    cfg = self.config
    if not cfg.mtp_layers:
      raise ValueError("Decoder.mtp_logits needs TransformerConfig.mtp_layers=1")
    chex.assert_equal_shape_prefix([hidden, next_tokens], 2)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(hidden.shape[1], dtype=jnp.int32), hidden.shape[:2])
    joined = jnp.concatenate([self.mtp_hidden_norm(hidden), self.mtp_embed_norm(self._embed(next_tokens))], -1)
    x = linear.project(joined.astype(cfg.dtype), self.mtp_proj, cfg.projection)
    mask = AttentionMask.self_attention(positions.astype(jnp.int32), segment_ids=segment_ids)
    x, _ = self.mtp_block(x, mask)
    return self._output_head(self.mtp_head_norm(x))

  def run(self, tokens: jax.Array, positions: jax.Array | None = None, *, caches: LayerCaches | None = None,
          segment_ids: jax.Array | None = None, stages: LayerStages | None = None, stage_params=None,
          last_only: bool = False) -> tuple[jax.Array, LayerCaches | None, TokenState]:
    """The forward of tokens [B, S] at positions [B, S]: (logits, updated caches, the tokens that came out).

    With `caches` the tokens are written to every layer's cache and attend over it (prefill and decode
    steps). With `stages` the hook between stages decides which tokens go on; the logits are those of the
    tokens that came out of the last stage (`TokenState.indices` says which). `last_only` keeps the last
    token's logits [B, 1, V] only, sparing the vocab projection of every other token.
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, S] int, got shape {tokens.shape}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    chex.assert_equal_shape([tokens, positions])
    x = self._embed(tokens)
    indices = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    state = TokenState(x=x, positions=positions.astype(jnp.int32), indices=indices)
    state, caches = self._layers(state, segment_ids, caches, self._expert_input(tokens, x), stages, stage_params)
    x = state.x[:, -1:] if last_only else state.x
    return self._logits(x), caches, state

  @property
  def _per_layer_expert_input(self) -> bool:
    return self.config.mole is not None and self.config.mole.lookup

  def _embedding_rows(self) -> jax.Array:
    # Replicated over the vocab axis: a gather from a vocab-sharded table would force the partitioner to
    # rematerialise it anyway, with a warning.
    return rules.constrain(self.embedding, (None, rules.ACT_EMBED))

  def _embed(self, tokens: jax.Array) -> jax.Array:
    x = jnp.take(self._embedding_rows(), tokens, axis=0).astype(self.config.dtype)
    return rules.constrain(x, (rules.BATCH, rules.LENGTH, rules.ACT_EMBED))

  def _expert_input(self, tokens: jax.Array, x: jax.Array) -> jax.Array | ExpertRows | None:
    """What MoLE experts read: the embedding output, or the embedding table and each token's row when a
    device holds more tokens than there are rows (training form); table rows [L, B, S, N, D] (lookup)."""
    mole = self.config.mole
    if mole is None:
      return None
    if not mole.lookup:
      if self.config.vocab_size >= tokens.size // rules.split_ways(rules.BATCH, rules.LENGTH):
        return x
      return ExpertRows(self._embedding_rows().astype(self.config.dtype), tokens)
    table = self.mole_table() if mole.table_storage in ("device", "host") else None
    hot = self.mole_hot_rows() if mole.hot_rows else None
    rows = lookup_rows(mole, mole_table_shape(self.config), table, tokens, self.config.dtype, hot)
    return jnp.moveaxis(rows, 2, 0)

  def _layers(self, state: TokenState, segment_ids: jax.Array | None, caches: LayerCaches | None,
              expert_input: jax.Array | None, stages: LayerStages | None, stage_params
              ) -> tuple[TokenState, LayerCaches | None]:
    cfg = self.config
    ranges = [(0, cfg.n_layers)] if stages is None else stages.ranges(cfg.n_layers)
    token_axis = 2 if self._per_layer_expert_input else 1
    stage_caches = []
    for stage, (first, end) in enumerate(ranges):
      if stage:
        state = stages.between(stage - 1, state, stage_params)
      mask = AttentionMask.self_attention(state.positions, segment_ids=_kept(segment_ids, state, 1, stage))
      layer_input = _kept(expert_input, state, token_axis, stage)
      layer_caches = _slice_layers(caches, first, end, cfg.scanned)
      if stages is None:
        x, layer_caches = self._all_layers(state.x, mask, layer_caches, layer_input)
      elif cfg.scanned:
        x, layer_caches = self._scan_layers(state.x, mask, first, end, layer_caches, layer_input)
      else:
        x, layer_caches = self._unrolled(state.x, mask, first, end, layer_caches, layer_input)
      state = state.replace(x=x)
      stage_caches.append(layer_caches)
    return state, _join_layers(stage_caches, cfg.scanned)

  def _all_layers(self, x, mask, caches, expert_input):
    if self.config.scanned:
      return self.blocks(x, mask, caches, expert_input)
    return self._unrolled(x, mask, 0, self.config.n_layers, caches, expert_input)

  def _unrolled(self, x, mask, first, end, caches, expert_input):
    new_caches = []
    for i in range(first, end):
      layer_input = expert_input[i] if self._per_layer_expert_input else expert_input
      x, cache = self.blocks[i](x, mask, None if caches is None else caches[i - first], layer_input)
      new_caches.append(cache)
    return x, None if caches is None else tuple(new_caches)

  def _scan_layers(self, x, mask, first, end, caches, expert_input):
    """Layers [first, end) of a scanned model, scanning a slice of the stacked params."""
    params = jax.tree.map(lambda a: a[first:end], self.variables["params"][LAYERS_KEY])
    block = DecoderBlock(self.config, parent=None)
    per_layer = self._per_layer_expert_input

    def body(x, layer):
      p, cache, layer_input = layer
      return block.apply({"params": p}, x, mask, cache, layer_input if per_layer else expert_input)

    return jax.lax.scan(body, x, (params, caches, expert_input[first:end] if per_layer else None))

  def _logits(self, x: jax.Array) -> jax.Array:
    return self._output_head(self.final_norm(x))

  def _output_head(self, x: jax.Array) -> jax.Array:
    """Logits of normalised hidden states x [B, S, D] through the (shared) output projection."""
    cfg = self.config
    if cfg.tie_embeddings:  # the embedding [V, D] is an [out, in] kernel in either layout
      logits = linear.project_out_in(x, self.embedding.astype(cfg.dtype), cfg.projection,
                                     preferred_element_type=jnp.float32)
    else:
      logits = linear.project(x, self.lm_head, cfg.projection, preferred_element_type=jnp.float32)
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


@functools.partial(jax.jit, static_argnums=(0, 3))
def forward_in_stages(config: TransformerConfig, params: dict, tokens: jax.Array, stages: LayerStages,
                      stage_params=None, positions: jax.Array | None = None) -> tuple[jax.Array, TokenState]:
  """The forward with a hook between stages of layers: (logits of the tokens that came out [B, S', V], those
  tokens). See pangu.models.stages."""
  logits, _, state = Decoder(config).apply({"params": params}, tokens, positions, stages=stages,
                                           stage_params=stage_params, method=Decoder.run)
  return logits, state


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

