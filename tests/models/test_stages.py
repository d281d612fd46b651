"""Layer-stack hooks: a hook that keeps every token changes nothing; one that drops tokens equals a float64
decoder that drops them at the same layers, with their original positions; the KV cache keeps only them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import infer, models
from pangu.models import LayerShape, LayerStages

from reference_decoder import decoder_logits

CONFIGS = {
    "scanned": models.tiny(n_layers=4),
    "unrolled_non_uniform": models.tiny(n_layers=3, layer_shapes=(LayerShape(4, 2, 128), LayerShape(2, 1, 96),
                                                                  LayerShape(4, 4, 64))),
}
S = 10


def _params(config):
  return models.init_params(config, jax.random.key(0))


def _keep_all(stage, tokens, params):
  return tokens


def _drop(stage, tokens, keep):
  """Keeps the token columns listed for this stage in `keep` (a traced hook parameter)."""
  return tokens.select(jnp.broadcast_to(keep[stage], (tokens.x.shape[0], keep[stage].shape[0])))


# Columns kept after stage 0 and after stage 1 (indices into the tokens present then); the last one survives.
FIRST, SECOND = np.array([0, 2, 3, 5, 7, 8, 9]), np.array([0, 1, 3, 5, 6])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_hook_that_keeps_every_token_gives_the_full_forward(name):
  config = CONFIGS[name]
  params = _params(config)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, S)).astype(np.int32)
  logits, state = models.forward_in_stages(config, params, tokens, LayerStages((1, 2), _keep_all))
  np.testing.assert_allclose(logits, models.forward(config, params, tokens), atol=1e-6, rtol=0)
  np.testing.assert_array_equal(state.indices, np.broadcast_to(np.arange(S), (2, S)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dropping_tokens_equals_the_float64_decoder_on_the_kept_tokens(name):
  config = CONFIGS[name]
  params = _params(config)
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, S)).astype(np.int32)
  first, second = FIRST, SECOND
  stages = LayerStages((1, 2), _drop)
  logits, state = models.forward_in_stages(config, params, tokens, stages, (jnp.asarray(first), jnp.asarray(second)))
  np.testing.assert_array_equal(state.indices[0], first[second])
  np.testing.assert_array_equal(state.positions[0], first[second])
  unrolled = models.unstack_layers(params, config.n_layers) if config.scanned else params
  float64 = jax.tree.map(lambda x: np.asarray(x, np.float64), unrolled)
  for row in range(2):
    want = decoder_logits(config, float64, tokens[row], keep={1: first, 2: second})
    np.testing.assert_allclose(logits[row], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_pruned_prefill_caches_only_the_kept_tokens_and_decodes_on(name):
  config = CONFIGS[name]
  params = _params(config)
  tokens = np.random.default_rng(2).integers(0, config.vocab_size, (1, S + 1)).astype(np.int32)
  first, second = FIRST, SECOND
  stages = LayerStages((1, 2), _drop)
  cache = infer.init_cache(config, jnp.zeros((1,), jnp.int32), S + 1)
  _, cache = infer.extend(config, params, tokens[:, :S], cache, stages=stages,
                          stage_params=(jnp.asarray(first), jnp.asarray(second)))
  kept_per_layer = [S, len(first), *[len(second)] * (config.n_layers - 2)]
  np.testing.assert_array_equal(cache.lengths[:, 0], kept_per_layer)
  positions = [np.arange(S), first, first[second]]
  for layer in range(config.n_layers):
    cached = cache.read_layer(layer)
    np.testing.assert_array_equal(cached.positions[0, :kept_per_layer[layer]], positions[min(layer, 2)])
  # The next token sits at position S in every layer and attends over what each layer kept.
  logits, cache = infer.extend(config, params, tokens[:, S:], cache)
  float64 = jax.tree.map(lambda x: np.asarray(x, np.float64),
                         models.unstack_layers(params, config.n_layers) if config.scanned else params)
  want = decoder_logits(config, float64, tokens[0], keep={1: np.append(first, S),
                                                          2: np.append(second, len(first))})[-1]
  np.testing.assert_allclose(logits[0, 0], want, atol=1e-4, rtol=1e-4)


def test_boundaries_are_checked():
  with pytest.raises(ValueError, match="strictly increasing"):
    LayerStages((2, 1), _keep_all)
  with pytest.raises(ValueError, match=r"must lie in \(0, 4\)"):
    LayerStages((4,), _keep_all).ranges(4)
