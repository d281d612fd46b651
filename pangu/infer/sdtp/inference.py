"""SDTP at inference: a layer-stack hook that really removes tokens, its baselines, and a FLOP counter.

Spec 3.6. At each stage the hook scores the tokens still present, keeps the forced ones (sinks, recent window)
plus the best-scoring others up to round(r^(s+1) N), and gathers them out in their original order with their
original RoPE positions (`TokenState.select`). Every later layer computes, and caches, only those tokens, so a
pruned `prefill` (pangu.infer.decoding, `stages=` / `stage_params=`) leaves a KV cache with fewer slots per layer
and decoding continues at position N. No Gumbel noise at inference.

Scorers (the same schedule and forced tokens for each; only the ranking differs):
  * "sdtp": the trained predictors (`stage_params` = their params);
  * "random": uniform scores (`stage_params` = a PRNG key);
  * "attention": the attention the last token pays to each token at the pruning layer, summed over heads,
    computed with that layer's own q / k projections (`stage_params` = `attention_scorer_params`), the
    training-free H2O-style baseline;
  * "local": recency (sinks + the most recent tokens; `stage_params` unused).

Composition with KV eviction (spec section 2, Table 6: SDTP + H2O): `prefill_with_eviction` runs the pruned
prefill into caches that record the attention mass each kept token receives, then cuts every layer to H2O's
budget (pangu.infer.eviction_cache), so `decoding.decode` continues with pruned prompt and evicting cache alike.
"""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp

from pangu.infer import decoding, eviction_cache
from pangu.infer.sdtp.predictor import keep_scores, predictor_flops, predictor_logits
from pangu.infer.sdtp.schedule import SDTPConfig, select_tokens
from pangu.models.config import TransformerConfig
from pangu.models.counting import layer_matmul_flops
from pangu.models.stages import LayerStages, TokenState
from pangu.models.transformer import layer_params
from pangu.nn import linear
from pangu.nn.norms import rms_norm
from pangu.nn.rope import apply_rope, rope_attention_factor, rope_frequencies

SCORERS = ("sdtp", "random", "attention", "local")
_MASKED = -1e30


def last_token_attention(model_config: TransformerConfig, layer: int, params: dict, tokens: TokenState) -> jax.Array:
  """[B, S] attention probability of the last token on each token at layer `layer` (params: that layer's
  params), summed over query heads; padding and empty slots get 0."""
  cfg = model_config.attention_config(layer)
  proj, dh = cfg.projection, cfg.head_dim
  attn = params["attn"]
  h = rms_norm(tokens.x, params["pre_attn_norm"]["scale"], model_config.norm_eps)

  def project(name, x):
    y = linear.project(x, attn[name].astype(proj.dtype), proj)
    return y + attn[f"{name}_bias"] if cfg.qkv_bias else y

  q, k = project("q", h[:, -1:]), project("k", h)
  if cfg.qk_norm:
    q, k = rms_norm(q, attn["q_norm"], cfg.norm_eps), rms_norm(k, attn["k_norm"], cfg.norm_eps)
  inv_freq, scale = rope_frequencies(dh, cfg.rope_theta, cfg.rope_scaling), rope_attention_factor(cfg.rope_scaling)
  q = apply_rope(q, tokens.positions[:, -1:], inv_freq, scale)
  k = apply_rope(k, tokens.positions, inv_freq, scale)
  batch, _, kv_heads, _ = k.shape
  q = q.reshape(batch, kv_heads, cfg.n_heads // kv_heads, dh)
  logits = jnp.einsum("bkgd,bskd->bkgs", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(dh)
  logits = jnp.where((tokens.positions >= 0)[:, None, None, :], logits, _MASKED)
  return jax.nn.softmax(logits, axis=-1).sum((1, 2))


@dataclasses.dataclass(frozen=True)
class PruneHook:
  """The `LayerStages.between` of a pruned prefill: hashable, so `prefill` compiles once per schedule.

  Attributes:
    model_config: the LM's config.
    config: the schedule.
    prompt_length: N, the prompt width (left-padded batches: the padded width).
    scorer: one of SCORERS.
  """

  model_config: TransformerConfig
  config: SDTPConfig
  prompt_length: int
  scorer: str = "sdtp"

  def __post_init__(self):
    if self.scorer not in SCORERS:
      raise ValueError(f"PruneHook.scorer must be one of {SCORERS}, got {self.scorer!r}")
    self.config.check(self.model_config.n_layers, self.prompt_length)

  def scores(self, stage: int, tokens: TokenState, stage_params) -> jax.Array:
    if self.scorer == "sdtp":
      return keep_scores(predictor_logits(stage_params, stage, tokens.x))
    if self.scorer == "random":
      return jax.random.uniform(jax.random.fold_in(stage_params, stage), tokens.positions.shape)
    if self.scorer == "attention":
      layer = self.config.layers[stage]
      return last_token_attention(self.model_config, layer, stage_params[f"stage_{stage}"], tokens)
    return tokens.positions.astype(jnp.float32)

  def __call__(self, stage: int, tokens: TokenState, stage_params) -> TokenState:
    chex.assert_rank(tokens.x, 3)
    counts = self.config.keep_counts(self.prompt_length)
    suffix = tokens.x.shape[1] - (self.prompt_length if stage == 0 else counts[stage - 1])
    if suffix < 0:
      raise ValueError(f"PruneHook: {tokens.x.shape[1]} tokens reach stage {stage}, fewer than the prompt of "
                       f"{self.prompt_length} tokens it was built for")
    keep = select_tokens(self.config, self.scores(stage, tokens, stage_params), tokens.positions,
                         self.prompt_length, counts[stage] + suffix)
    return tokens.select(keep)


def pruning_stages(model_config: TransformerConfig, config: SDTPConfig, prompt_length: int,
                   scorer: str = "sdtp") -> LayerStages:
  """The `stages` argument of `prefill` / `forward_in_stages` for a prompt of `prompt_length` tokens; an
  impossible schedule for this depth or length is an error here."""
  return LayerStages(config.layers, PruneHook(model_config, config, prompt_length, scorer))


def attention_scorer_params(model_config: TransformerConfig, config: SDTPConfig, lm_params: dict) -> dict:
  """The `stage_params` of the "attention" scorer: each pruning layer's params."""
  return {f"stage_{s}": layer_params(model_config, lm_params, layer) for s, layer in enumerate(config.layers)}


def tokens_per_layer(model_config: TransformerConfig, config: SDTPConfig | None, prompt_length: int) -> list[int]:
  """How many prompt tokens each layer computes in a (pruned) prefill."""
  if config is None:
    return [prompt_length] * model_config.n_layers
  counts = config.check(model_config.n_layers, prompt_length)
  alive, per_layer = prompt_length, []
  for layer in range(model_config.n_layers):
    stages_before = sum(l <= layer for l in config.layers)
    per_layer.append(counts[stages_before - 1] if stages_before else alive)
  return per_layer


def prefill_flops(model_config: TransformerConfig, config: SDTPConfig | None, prompt_length: int) -> float:
  """Matmul FLOPs of a prefill of one prompt (`pangu.models.counting` convention, the full score matrix of each
  layer's kept tokens), the last token's logits, and, when pruned, the predictors."""
  per_layer = tokens_per_layer(model_config, config, prompt_length)
  total = sum(layer_matmul_flops(model_config, i, n, n) for i, n in enumerate(per_layer))
  total += 2 * model_config.d_model * model_config.vocab_size
  if config is not None:
    total += predictor_flops(config, model_config.d_model, [per_layer[l - 1] for l in config.layers])
  return float(total)


def prefill_with_eviction(model_config: TransformerConfig, gen: decoding.GenerationConfig, params: dict,
                          tokens: jax.Array, start: jax.Array, rng: jax.Array, *, config: SDTPConfig,
                          stage_params, budget: int, recent: int, scorer: str = "sdtp") -> decoding.DecodeState:
  """SDTP-pruned prefill of tokens [B, N] (left-padded, start [B]), then H2O eviction: each layer keeps its
  `recent` latest tokens and the heaviest others up to `budget` slots, ranked by the attention mass the pruned
  prefill's queries paid them. The returned state decodes with `decoding.decode`, every new token evicting the
  lightest older slot. A budget of at least N + gen.max_new_tokens - 1 slots evicts nothing."""
  stages = pruning_stages(model_config, config, tokens.shape[1], scorer)
  state = decoding.prefill(model_config, gen, params, tokens, start, rng, stages=stages, stage_params=stage_params,
                           layer_cache=eviction_cache.AttentionMassRecorder.empty)
  return state.replace(cache=eviction_cache.to_heavy_hitter(state.cache, budget=budget, recent=recent))
