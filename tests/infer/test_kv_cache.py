"""The KV cache interface: another implementation plugs into the engine unchanged, and rows hold different
numbers of tokens."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import infer, models
from pangu.infer import decoding
from pangu.infer.kv_cache import write_rows
from pangu.nn.attention import CachedKV

CONFIGS = {
    "scanned": models.tiny(),
    "unrolled_non_uniform": models.tiny(layer_shapes=(models.LayerShape(4, 2, 128), models.LayerShape(2, 1, 96))),
}


@flax.struct.dataclass
class SlotsMajorCache:
  """A second implementation: slots before heads ([B, T, K, Dh]), and a count of its writes."""

  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  lengths: jax.Array
  writes: jax.Array

  @classmethod
  def empty(cls, batch, kv_heads, max_length, head_dim, dtype):
    zeros = jnp.zeros((batch, max_length, kv_heads, head_dim), dtype)
    return cls(zeros, zeros, jnp.full((batch, max_length), -1, jnp.int32), jnp.zeros((batch,), jnp.int32),
               jnp.zeros((), jnp.int32))

  def write(self, keys, values, positions):
    return SlotsMajorCache(write_rows(self.keys, keys, self.lengths, 0), write_rows(self.values, values, self.lengths, 0),
                           write_rows(self.positions, positions, self.lengths, 0), self.lengths + keys.shape[1],
                           self.writes + 1)

  def read(self):
    return CachedKV(self.keys.swapaxes(1, 2), self.values.swapaxes(1, 2), self.positions, self.lengths)

  def drop_last(self, n):
    return self.replace(lengths=self.lengths - n)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_second_cache_implementation_plugs_into_the_engine(name):
  config = CONFIGS[name]
  params = models.init_params(config, jax.random.key(0))
  prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7], [9]]
  gen = infer.GenerationConfig(max_new_tokens=6)
  # decoding.generate: importing the CLI module pangu.infer.generate replaces the package's `generate`.
  want = decoding.generate(config, params, prompts, gen, jax.random.key(1))
  tokens, start = infer.left_pad(prompts, 0, infer.prompt_bucket(7))
  state = infer.prefill(config, gen, params, tokens, start, jax.random.key(1), layer_cache=SlotsMajorCache.empty)
  state = infer.decode(config, gen, params, state)
  got = [row[:n] for row, n in zip(*jax.device_get((state.tokens, state.lengths)))]
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  writes = [int(np.max(layer.writes)) for layer in
            (state.cache.layers if isinstance(state.cache.layers, tuple) else [state.cache.layers])]
  assert writes == [gen.max_new_tokens] * len(writes)  # prefill + one write per decode step, in every layer


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rows_that_accept_different_numbers_of_tokens_equal_each_row_alone(name):
  """Draft and verify: every row gets 4 draft tokens, keeps 4, 2 or 0 of them, then decodes on."""
  config = CONFIGS[name]
  params = models.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(3)
  prompt, drafts, after = (rng.integers(0, config.vocab_size, (3, n)).astype(np.int32) for n in (5, 4, 2))
  accepted = np.array([4, 2, 0])
  cache = infer.init_cache(config, jnp.zeros((3,), jnp.int32), 12)
  _, cache = infer.extend(config, params, prompt, cache)
  _, cache = infer.extend(config, params, drafts, cache)
  cache = cache.drop_last(4 - accepted)
  np.testing.assert_array_equal(cache.lengths, np.broadcast_to(5 + accepted, (config.n_layers, 3)))
  for step in range(after.shape[1]):
    logits, cache = infer.extend(config, params, after[:, step:step + 1], cache)
    for row in range(3):
      alone = np.concatenate([prompt[row], drafts[row, :accepted[row]], after[row, :step + 1]])
      want = models.forward(config, params, alone[None])[0, -1]
      np.testing.assert_allclose(logits[row, 0], want, atol=1e-5)


def test_a_full_cache_refuses_more_tokens():
  config = CONFIGS["scanned"]
  params = models.init_params(config, jax.random.key(0))
  cache = infer.init_cache(config, jnp.zeros((1,), jnp.int32), 4)
  _, cache = infer.extend(config, params, jnp.ones((1, 3), jnp.int32), cache)
  with pytest.raises(ValueError, match="2 tokens do not fit a cache with 1 free slots"):
    infer.extend(config, params, jnp.ones((1, 2), jnp.int32), cache)
