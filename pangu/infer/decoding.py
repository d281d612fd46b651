"""Batched generation: left-padded prefill, then a jitted while-loop of cached decode steps.

The engine is three public pieces that compose; the phases are separate jitted functions so callers can time
them (prefill is compute bound, decode is bound by reading the weights and the cache once per step):
  1. `prefill`: one `extend_cache` over the padded prompts [B, S] into an empty cache of
     S + max_new_tokens - 1 slots, then the first new token. `layer_cache` chooses the cache implementation
     (an offloaded or quantised one, pangu.infer.kv_cache) and `stages` a pruned prefill (SDTP).
  2. `decode_step`: one token per row, a pure function of the state, for loops of one's own (draft and verify).
  3. `decode`: `jax.lax.while_loop` of `decode_step` until every row hit a stop token or max_new_tokens were
     produced; the state (cache included) is donated, so the cache is updated in place.
"""

import dataclasses
import functools
from collections.abc import Sequence

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pangu.infer.kv_cache import KVCache, LayerCacheFactory, extend_cache, init_cache
from pangu.infer.sampling import SamplingConfig, sample
from pangu.models.config import TransformerConfig
from pangu.models.param_layout import convert_param_layout
from pangu.models.stages import LayerStages
from pangu.models.transformer import Decoder, unstack_layers
from pangu.parallel import rules
from pangu.parallel.mesh import require_no_pipeline


# Prompts are padded to at least this many slots (see `prompt_bucket`).
MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """What to generate.

  Attributes:
    max_new_tokens: upper bound on the tokens produced per row (the stop token included).
    sampling: greedy / temperature / top-k / top-p settings.
    stop_tokens: ids that end a row; the stop token is emitted, then the row produces `pad_id`.
    pad_id: fills the left padding of prompts and the output after a row stopped.
  """

  max_new_tokens: int
  sampling: SamplingConfig = SamplingConfig()
  stop_tokens: tuple[int, ...] = ()
  pad_id: int = 0

  def __post_init__(self):
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise ValueError(f"GenerationConfig.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
    object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
    if any(t < 0 for t in self.stop_tokens) or self.pad_id < 0:
      raise ValueError(f"GenerationConfig token ids must be >= 0, got stop_tokens={self.stop_tokens}, "
                       f"pad_id={self.pad_id}")


@flax.struct.dataclass
class DecodeState:
  """Loop state between steps. tokens [B, N] holds the output so far, `step` of it are written."""

  cache: KVCache
  last: jax.Array  # [B] the most recent token, the next step's input
  tokens: jax.Array  # [B, N]
  lengths: jax.Array  # [B] tokens produced per row, the stop token included
  done: jax.Array  # [B] row has emitted a stop token
  step: jax.Array  # [] columns of `tokens` written
  rng: jax.Array
  stop_tokens: jax.Array  # [n_stop] a traced array, so that changing them does not recompile


def decode_layout(config: TransformerConfig, params: dict) -> tuple[TransformerConfig, dict]:
  """The layout decoding should use on CPU: layers unrolled and kernels stored [out, in] (`param_layout="decode"`).

  In a scanned model XLA:CPU copies every layer's weights out of the stacked [L, ...] arrays on every step
  (a dynamic-slice feeding each matmul), doubling the memory traffic that bounds a decode step: 54 ms vs
  15 ms per step for the small preset at batch 1. The skinny [B, D] x kernel matmuls of a step also run faster
  on [out, in] kernels (pangu.nn.linear). Each conversion costs one copy of the weights. MoE layers switch
  from `blocked` experts, which pay one padded block per expert, to the `selected` loop over the few experts
  a step's tokens chose.
  """
  if config.moe is not None and config.moe.experts_implementation in ("auto", "blocked"):
    config = config.replace(moe=config.moe.replace(experts_implementation="selected"))
  if config.scanned:
    config, params = config.replace(scan_layers=False), unstack_layers(params, config.n_layers)
  return convert_param_layout(config, params, "decode")


def prompt_bucket(length: int, smallest: int = MIN_PROMPT_BUCKET) -> int:
  """The padded prompt width for a longest prompt of `length`: the next power of two, at least `smallest`.

  Prefill and decode compile once per (batch, width), so padding to a few widths spares a compile for every
  new prompt length; the extra left padding is masked, which changes no output.
  """
  return max(smallest, 1 << (length - 1).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Prompts of different lengths -> (tokens [B, S] int32 right-aligned, start [B] = first real slot).

  S is `width` (see `prompt_bucket`), or the longest prompt's length when None.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError(f"need at least one prompt and no empty prompt, got lengths {[len(p) for p in prompts]}")
  longest = max(len(p) for p in prompts)
  width = longest if width is None else width
  if width < longest:
    raise ValueError(f"left_pad width={width} is shorter than the longest prompt ({longest} tokens)")
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = prompt
  return tokens, np.array([width - len(p) for p in prompts], np.int32)


def decode_step(config: TransformerConfig, gen: GenerationConfig, params: dict, state: DecodeState) -> DecodeState:
  """One more token for every row (pad for rows that stopped); traceable, for use inside jit and loops."""
  logits, cache = extend_cache(Decoder(config), params, state.last[:, None], state.cache)
  rng, key = jax.random.split(state.rng)
  token = jnp.where(state.done, gen.pad_id, sample(logits[:, 0], key, gen.sampling))
  return state.replace(
      cache=cache, last=token,
      tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], state.step, axis=1),
      lengths=state.lengths + ~state.done, done=state.done | jnp.isin(token, state.stop_tokens),
      step=state.step + 1, rng=rng)


def _static(gen: GenerationConfig) -> GenerationConfig:
  """The part of `gen` that shapes the compiled program (stop tokens travel as an array)."""
  return dataclasses.replace(gen, stop_tokens=())


def _stop_array(gen: GenerationConfig) -> jax.Array:
  """Stop tokens padded with -1 (never sampled) to a multiple of 4, so most changes of them reuse the compile."""
  padded = -np.ones(max(4, -(-len(gen.stop_tokens) // 4) * 4), np.int32)
  padded[:len(gen.stop_tokens)] = gen.stop_tokens
  return jnp.asarray(padded)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("layer_cache", "stages"))
def _prefill(config: TransformerConfig, gen: GenerationConfig, params: dict, tokens: jax.Array,
             start: jax.Array, rng: jax.Array, stop_tokens: jax.Array, *, layer_cache: LayerCacheFactory | None,
             stages: LayerStages | None, stage_params) -> DecodeState:
  batch, width = tokens.shape
  chex.assert_shape(start, (batch,))
  cache = init_cache(config, start, width + gen.max_new_tokens - 1, layer_cache=layer_cache)
  logits, cache = extend_cache(Decoder(config), params, tokens, cache, last_only=True, stages=stages,
                               stage_params=stage_params)
  rng, key = jax.random.split(rng)
  first = sample(logits[:, 0], key, gen.sampling)
  output = jnp.full((batch, gen.max_new_tokens), gen.pad_id, jnp.int32).at[:, 0].set(first)
  return DecodeState(cache=cache, last=first, tokens=output, lengths=jnp.ones((batch,), jnp.int32),
                     done=jnp.isin(first, stop_tokens), step=jnp.ones((), jnp.int32), rng=rng,
                     stop_tokens=stop_tokens)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _decode(config: TransformerConfig, gen: GenerationConfig, params: dict, state: DecodeState) -> DecodeState:
  return jax.lax.while_loop(lambda s: (s.step < gen.max_new_tokens) & ~jnp.all(s.done),
                            functools.partial(decode_step, config, gen, params), state)


def _in_mesh(mesh: Mesh | None, logical_rules: rules.LogicalRules, fn, *args, **kwargs):
  if mesh is None:
    return fn(*args, **kwargs)
  require_no_pipeline(mesh, "generation")
  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules):
    return fn(*args, **kwargs)


def prefill(config: TransformerConfig, gen: GenerationConfig, params: dict, tokens: jax.Array, start: jax.Array,
            rng: jax.Array, *, mesh: Mesh | None = None, logical_rules: rules.LogicalRules = rules.DEFAULT_RULES,
            layer_cache: LayerCacheFactory | None = None, stages: LayerStages | None = None,
            stage_params=None) -> DecodeState:
  """Left-padded prompts tokens [B, S] with start [B] (see `left_pad`) -> state holding the first new token.

  layer_cache: builds each layer's empty cache (see pangu.infer.kv_cache; None: its `default_layer_cache`); a
    static argument, so pass the same function object to reuse the compile.
  stages, stage_params: run the prompt through the layers in stages with a hook between them (token pruning);
    the hook must keep each row's last token.
  """
  return _in_mesh(mesh, logical_rules, _prefill, config, _static(gen), params, tokens, start, rng, _stop_array(gen),
                  layer_cache=layer_cache, stages=stages, stage_params=stage_params)


def decode(config: TransformerConfig, gen: GenerationConfig, params: dict, state: DecodeState, *,
           mesh: Mesh | None = None, logical_rules: rules.LogicalRules = rules.DEFAULT_RULES) -> DecodeState:
  """Runs decode steps until every row stopped or produced max_new_tokens. `state` is donated."""
  return _in_mesh(mesh, logical_rules, _decode, config, _static(gen), params, state)


def generate(config: TransformerConfig, params: dict, prompts: Sequence[Sequence[int]], gen: GenerationConfig,
             rng: jax.Array, *, mesh: Mesh | None = None, logical_rules: rules.LogicalRules = rules.DEFAULT_RULES,
             layer_cache: LayerCacheFactory | None = None, stages: LayerStages | None = None,
             stage_params=None) -> list[np.ndarray]:
  """Continues each prompt (a list of token ids): one int32 array per prompt, ending at its stop token.

  Prompts are left-padded to a `prompt_bucket` width, so prompt lengths within a bucket share one compile.
  `layer_cache`, `stages` and `stage_params` go to `prefill`.
  """
  tokens, start = left_pad(prompts, gen.pad_id, prompt_bucket(max(len(p) for p in prompts)))
  state = prefill(config, gen, params, tokens, start, rng, mesh=mesh, logical_rules=logical_rules,
                  layer_cache=layer_cache, stages=stages, stage_params=stage_params)
  state = decode(config, gen, params, state, mesh=mesh, logical_rules=logical_rules)
  out, lengths = jax.device_get((state.tokens, state.lengths))
  return [row[:n] for row, n in zip(out, lengths)]
