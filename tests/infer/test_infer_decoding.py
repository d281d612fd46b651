"""KV-cached decoding against the full forward pass, and the generation loop's bookkeeping."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import infer, models
from pangu.infer import decoding
from pangu.models import LayerShape

CONFIGS = {
    "scanned_yarn": models.tiny(rope_scaling=models.RopeScaling("yarn", 4.0, original_max_position_embeddings=8)),
    "unrolled_non_uniform_qwen3": models.tiny(qk_norm=True, attention_bias=True, attention_output_bias=True,
                                              mlp_bias=True, tie_embeddings=True,
                                              layer_shapes=(LayerShape(4, 2, 128), LayerShape(2, 1, 96)),
                                              rope_scaling=models.RopeScaling("llama3", 4.0, 1.0, 4.0, 16)),
}
PROMPT_LENGTHS = (3, 9, 6)
STEPS = 5


def _random_params(config, seed=1):
  """Unit-scale weights (no compile needed), so each layer and each cached key visibly moves the logits."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(s.shape[-1]), s.dtype),
                      nn.unbox(models.abstract_params(config)))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
  config = CONFIGS[request.param]
  return config, _random_params(config)


@pytest.mark.parametrize("layout", ["training", "decode"])
def test_cached_decoding_matches_full_forward_at_every_step(model, layout):
  config, params = model
  rng = np.random.default_rng(2)
  sequences = [rng.integers(0, config.vocab_size, n + STEPS).astype(np.int32) for n in PROMPT_LENGTHS]
  # Reference: the full forward pass over each whole sequence. Right padding to a common length changes no
  # earlier logit (causality), so one batched call covers every row.
  width = max(len(s) for s in sequences)
  full = np.asarray(models.forward(config, params, np.stack([np.pad(s, (0, width - len(s))) for s in sequences])))

  # The decode layout ([out, in] kernels, unrolled) runs the cached path; the training layout is the reference.
  if layout == "decode":
    config, params = infer.decode_layout(config, params)
  tokens, start = infer.left_pad([s[:n] for s, n in zip(sequences, PROMPT_LENGTHS)], pad_id=0)
  cache = infer.init_cache(config, jnp.asarray(start), tokens.shape[1] + STEPS)
  logits, cache = infer.extend(config, params, tokens, cache)
  for row, n in enumerate(PROMPT_LENGTHS):
    np.testing.assert_allclose(logits[row, -n:], full[row, :n], atol=1e-5, rtol=0)
  for step in range(STEPS):
    token = np.array([s[n + step] for s, n in zip(sequences, PROMPT_LENGTHS)], np.int32)[:, None]
    logits, cache = infer.extend(config, params, token, cache)
    want = np.stack([full[row, n + step] for row, n in enumerate(PROMPT_LENGTHS)])
    np.testing.assert_allclose(logits[:, 0], want, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(cache.lengths, tokens.shape[1] + STEPS)


def test_cache_layout_follows_the_params(model):
  config, _ = model
  cache = infer.init_cache(config, jnp.zeros((2,), jnp.int32), 7)
  if config.scanned:
    keys, values = cache.layers.keys, cache.layers.values
    assert keys.shape == values.shape == (config.n_layers, 2, config.n_kv_heads, 7, config.head_dim)
  else:
    assert [c.keys.shape for c in cache.layers] == [(2, s.n_kv_heads, 7, config.head_dim) for s in config.layer_shapes]
  stored = [cache.read_layer(i) for i in range(config.n_layers)]
  assert infer.cache_bytes(config, 2, 7) == sum(c.keys.nbytes + c.values.nbytes for c in stored)


def test_stop_tokens_and_max_new_tokens():
  config = CONFIGS["scanned_yarn"]  # the loop is the same for both layouts; `extend` is what differs
  params = _random_params(config)
  prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7]]
  free = infer.generate(config, params, prompts, infer.GenerationConfig(max_new_tokens=6), jax.random.key(0))
  assert [len(row) for row in free] == [6, 6]
  stop = int(free[0][2])
  stopped = infer.generate(config, params, prompts,
                           infer.GenerationConfig(max_new_tokens=6, stop_tokens=(stop,)), jax.random.key(0))
  first_stop = [list(row).index(stop) + 1 if stop in row else len(row) for row in free]
  for got, want, n in zip(stopped, free, first_stop):
    np.testing.assert_array_equal(got, want[:n])  # emitted up to and including the stop token


def test_left_pad_aligns_prompts_right():
  tokens, start = infer.left_pad([[1, 2], [3, 4, 5, 6]], pad_id=9)
  np.testing.assert_array_equal(tokens, [[9, 9, 1, 2], [3, 4, 5, 6]])
  np.testing.assert_array_equal(start, [2, 0])
  tokens, start = infer.left_pad([[1, 2], [3, 4, 5, 6]], pad_id=9, width=6)
  np.testing.assert_array_equal(tokens, [[9, 9, 9, 9, 1, 2], [9, 9, 3, 4, 5, 6]])
  np.testing.assert_array_equal(start, [4, 2])
  with pytest.raises(ValueError, match="empty prompt"):
    infer.left_pad([[1], []], pad_id=0)
  with pytest.raises(ValueError, match="width=3"):
    infer.left_pad([[1, 2], [3, 4, 5, 6]], pad_id=0, width=3)


def test_prompt_buckets_are_powers_of_two_from_the_smallest():
  assert [infer.prompt_bucket(n) for n in (1, 16, 17, 32, 33, 100)] == [16, 16, 32, 32, 64, 128]
  assert infer.prompt_bucket(3, smallest=4) == 4


def test_bucketed_prompts_generate_the_same_tokens_and_share_one_compile():
  config = CONFIGS["scanned_yarn"]
  params = _random_params(config)
  gen = infer.GenerationConfig(max_new_tokens=4)
  prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4]]
  # Reference: the unbucketed path, padded only to the longest prompt.
  tokens, start = infer.left_pad(prompts, gen.pad_id)
  state = infer.decode(config, gen, params, infer.prefill(config, gen, params, tokens, start, jax.random.key(0)))
  exact = [row[:n] for row, n in zip(*jax.device_get((state.tokens, state.lengths)))]
  bucketed = infer.generate(config, params, prompts, gen, jax.random.key(0))  # width 16, not 9
  for got, want in zip(bucketed, exact):
    np.testing.assert_array_equal(got, want)
  compiles = decoding._prefill._cache_size(), decoding._decode._cache_size()
  infer.generate(config, params, [[1, 2], [3] * 12, [4] * 5], gen, jax.random.key(0))  # the same bucket
  assert (decoding._prefill._cache_size(), decoding._decode._cache_size()) == compiles


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, stop_tokens=(-1,)), "stop_tokens"),
])
def test_generation_config_names_bad_fields(kwargs, field):
  with pytest.raises(ValueError, match=field):
    infer.GenerationConfig(**kwargs)
