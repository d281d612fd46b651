"""SDTP: the schedule and its checks, the forced tokens, the ranking loss against NumPy, the saliency against a
finite difference, predictor training that leaves the LM alone, and the pruned prefill (positions, masked =
gathered forward, KV cache, generation after it, FLOPs), also on checkpoints transformers wrote."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import infer, models
from pangu.infer import sdtp
from pangu.interop import hf
from pangu.models.counting import layer_matmul_flops
from pangu.parallel import single_device_mesh
from pangu.train.config import TrainConfig

CONFIG = models.tiny(n_layers=4)
N = 40
SCHEDULE = sdtp.SDTPConfig(layers=(1, 2, 3), keep_ratio=0.8)


@pytest.fixture(scope="module")
def lm_params():
  return models.init_params(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def predictors():
  return sdtp.init_predictors(SCHEDULE, CONFIG.d_model, jax.random.key(1))


def _tokens(seed, length=N, batch=2, vocab=CONFIG.vocab_size):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def _recording(stages):
  """stages whose hook also records the input indices of the tokens each stage keeps."""
  kept = []

  def between(stage, tokens, params):
    out = stages.between(stage, tokens, params)
    jax.debug.callback(lambda indices: kept.append(np.asarray(indices)), out.indices, ordered=True)
    return out

  return models.LayerStages(stages.boundaries, between), kept


def test_paper_schedule_scaled_to_depth():
  assert sdtp.SDTPConfig.scaled_to_depth(32).layers == tuple(range(4, 32, 3))
  assert sdtp.SDTPConfig.scaled_to_depth(12).layers == tuple(range(2, 12))
  assert sdtp.SDTPConfig.scaled_to_depth(12, n_stages=5).layers == (2, 3, 4, 5, 6)
  counts = sdtp.SDTPConfig.scaled_to_depth(32).keep_counts(1000)
  np.testing.assert_array_equal(counts, [round(1000 * 0.9 ** (s + 1)) for s in range(10)])


def test_impossible_schedules_are_errors():
  with pytest.raises(ValueError, match="impossible for a 8-layer model"):
    sdtp.SDTPConfig.scaled_to_depth(8)
  with pytest.raises(ValueError, match="impossible for a 4-layer model"):
    sdtp.pruning_stages(CONFIG, sdtp.SDTPConfig(layers=(2, 4)), N)
  with pytest.raises(ValueError, match="impossible for a 16-token prompt"):
    sdtp.SDTPConfig(layers=(1, 2, 3), keep_ratio=0.5).keep_counts(16)
  with pytest.raises(ValueError, match="keep_ratio"):
    sdtp.SDTPConfig(layers=(1,), keep_ratio=1.5)
  with pytest.raises(ValueError, match="strictly increasing"):
    sdtp.SDTPConfig(layers=(3, 2))
  with pytest.raises(ValueError, match="saliency_reduce"):
    sdtp.SDTPConfig(layers=(1,), saliency_reduce="mean")
  with pytest.raises(ValueError, match="rank_pair_weight must be one of"):
    sdtp.SDTPConfig(layers=(1,), rank_pair_weight="lambda")


def test_keep_ratio_one_gives_the_full_forward(lm_params, predictors):
  tokens = _tokens(0)
  stages = sdtp.pruning_stages(CONFIG, sdtp.SDTPConfig(layers=(1, 2, 3), keep_ratio=1.0), N)
  logits, state = models.forward_in_stages(CONFIG, lm_params, tokens, stages, predictors)
  np.testing.assert_allclose(logits, models.forward(CONFIG, lm_params, tokens), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(state.positions, np.broadcast_to(np.arange(N), (2, N)))


@pytest.mark.parametrize("scorer", sdtp.SCORERS)
def test_kept_tokens_keep_their_positions_and_the_forced_tokens_survive(lm_params, predictors, scorer):
  params = {"sdtp": predictors, "random": jax.random.key(3), "local": None,
            "attention": sdtp.attention_scorer_params(CONFIG, SCHEDULE, lm_params)}[scorer]
  stages, kept = _recording(sdtp.pruning_stages(CONFIG, SCHEDULE, N, scorer))
  _, state = models.forward_in_stages(CONFIG, lm_params, _tokens(1), stages, params)
  counts = SCHEDULE.keep_counts(N)
  forced = [0, 1, 2, 3, *range(N - math.ceil(0.1 * N), N)]
  for stage, indices in enumerate(kept):
    assert indices.shape == (2, counts[stage])
    for row in indices:
      assert np.all(np.diff(row) > 0)  # original order
      assert set(forced) <= set(row.tolist())
  np.testing.assert_array_equal(state.positions, state.indices)  # position = index in the prompt


def test_the_attention_scorer_matches_a_numpy_softmax(lm_params):
  tokens = models.TokenState(x=jax.random.normal(jax.random.key(4), (1, 6, CONFIG.d_model)),
                             positions=jnp.array([[0, 1, 3, 4, 7, 9]]), indices=jnp.arange(6)[None])
  layer = models.layer_params(CONFIG, lm_params, 2)
  got = sdtp.last_token_attention(CONFIG, 2, layer, tokens)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), layer)
  x = np.asarray(tokens.x[0], np.float64)
  h = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + CONFIG.norm_eps) * p["pre_attn_norm"]["scale"]
  dh = CONFIG.head_dim
  q, k = np.einsum("d,dhe->he", h[-1], p["attn"]["q"]), np.einsum("sd,dhe->she", h, p["attn"]["k"])
  inv = 1.0 / CONFIG.rope_theta ** (np.arange(0, dh, 2) / dh)

  def rope(v, pos):
    a = pos * inv
    v1, v2 = v[..., :dh // 2], v[..., dh // 2:]
    return np.concatenate([v1 * np.cos(a) - v2 * np.sin(a), v2 * np.cos(a) + v1 * np.sin(a)], -1)

  positions = np.array([0, 1, 3, 4, 7, 9])
  q = rope(q, positions[-1])
  k = np.stack([rope(k[s], positions[s]) for s in range(6)])
  group = CONFIG.n_heads // CONFIG.n_kv_heads
  logits = np.einsum("hd,shd->hs", q, np.repeat(k, group, axis=1)) / np.sqrt(dh)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  want = (probs / probs.sum(-1, keepdims=True)).sum(0)
  np.testing.assert_allclose(got[0], want, atol=1e-4)


@pytest.mark.parametrize("pair_weight", ["uniform", "target_gap"])
def test_ranking_loss_matches_numpy(pair_weight):
  rng = np.random.default_rng(5)
  scores, targets = rng.normal(size=(3, 12)), rng.uniform(size=(3, 12)).round(1)  # rounding makes some ties
  valid = rng.uniform(size=(3, 12)) < 0.7
  want = []
  for s, t, v in zip(scores, targets, valid):
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12) if v[i] and v[j]]
    terms = np.array([np.log1p(np.exp(-(s[i] - s[j]) * np.sign(t[i] - t[j]))) for i, j in pairs])
    weights = np.ones(len(pairs)) if pair_weight == "uniform" else np.array([abs(t[i] - t[j]) for i, j in pairs])
    want.append(np.sum(weights * terms) / np.sum(weights))
  got = sdtp.ranking_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(targets, jnp.float32), jnp.asarray(valid),
                          pair_weight)
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)


def _batch(seed, prompt, suffix, vocab=CONFIG.vocab_size):
  tokens = _tokens(seed, prompt + suffix + 1, vocab=vocab)
  mask = np.zeros((2, prompt + suffix), np.float32)
  mask[:, prompt - 1:] = 1.0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


def test_saliency_is_gradient_times_input(lm_params):
  config = sdtp.SDTPConfig(layers=(1, 2, 3), keep_ratio=0.8, saliency_reduce="signed_sum")
  batch = _batch(6, N, 8)
  got = sdtp.saliency(CONFIG, config, lm_params, batch, N)
  assert got.shape == (3, 2, N + 8)
  np.testing.assert_array_equal(got[:, :, N:], 0.0)
  # Independently: the derivative of the loss in a per-token scale of the states entering layer 2 is sum_d x g.

  def loss(scale):
    hook = lambda s, state, _: state.replace(x=state.x * scale[..., None]) if s == 1 else state
    logits, _ = models.forward_in_stages(CONFIG, lm_params, batch["inputs"], models.LayerStages((1, 2, 3), hook))
    return models.cross_entropy_loss(logits, batch["targets"], batch["mask"])[0]

  want = np.asarray(jax.grad(loss)(jnp.ones((2, N + 8))))[:, :N]
  want = want / np.abs(want).max(axis=1, keepdims=True)
  np.testing.assert_allclose(got[1, :, :N], want, atol=1e-4)
  x_times_grad = np.array([[3.0, -4.0], [1.0, 1.0]])
  np.testing.assert_allclose(sdtp.reduce_saliency(x_times_grad, "abs_sum"), [1.0, 2.0])
  np.testing.assert_allclose(sdtp.reduce_saliency(x_times_grad, "l2"), [5.0, np.sqrt(2)], rtol=1e-6)


def test_training_changes_only_the_predictors(lm_params):
  schedule, prompt = sdtp.SDTPConfig(layers=(1, 3), keep_ratio=0.8), 24
  predictors = sdtp.init_predictors(schedule, CONFIG.d_model, jax.random.key(1))
  batch = _batch(7, prompt, 4)
  loss_fn = sdtp.sdtp_loss(CONFIG, schedule, prompt)
  lm_grads = jax.jit(jax.grad(lambda lm: loss_fn(predictors, lm, batch, jax.random.key(0))[0]))(lm_params)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(lm_grads))
  # Through the shared train step: its state holds the predictors only; the LM is an input of the loss.
  train_config = TrainConfig(peak_lr=1e-2, warmup_steps=1, total_steps=10, weight_decay=0.0)
  state, step = sdtp.predictor_training(CONFIG, schedule, prompt, lm_params, train_config, single_device_mesh(),
                                        jax.random.key(1))
  start = jax.tree.map(np.array, state.params)
  assert jax.tree.structure(start) == jax.tree.structure(predictors)
  before = jax.tree.map(np.array, lm_params)
  for _ in range(2):
    state, metrics = step(state, batch)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, lm_params))
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(start)))
  assert int(state.step) == 2 and metrics["per_layer_grad_norm"].shape == (schedule.n_stages,)
  np.testing.assert_allclose(metrics["kept_fraction"], schedule.keep_counts(prompt)[-1] / prompt)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["rank"]) > 0 and float(metrics["grad_norm"]) > 0


def _hide_dropped(stage, tokens, alive):
  """Masked forward: tokens not alive at a stage stay in the array but are no key for anyone from then on."""
  return tokens.replace(positions=jnp.where(alive[stage], tokens.positions, -1))


def test_pruned_prefill_matches_the_masked_forward_and_generation_continues(lm_params, predictors):
  prompt = _tokens(8, N, batch=1)
  stages = sdtp.pruning_stages(CONFIG, SCHEDULE, N)
  recording, kept = _recording(stages)
  jax.block_until_ready(models.forward_in_stages(CONFIG, lm_params, prompt, recording, predictors))
  gen = infer.GenerationConfig(max_new_tokens=3)
  state = infer.prefill(CONFIG, gen, lm_params, prompt, jnp.zeros((1,), jnp.int32), jax.random.key(0),
                        stages=stages, stage_params=predictors)
  np.testing.assert_array_equal(state.cache.lengths[:, 0], sdtp.tokens_per_layer(CONFIG, SCHEDULE, N))
  np.testing.assert_array_equal(state.cache.next_positions, [N])  # decoding goes on at the original length
  out = np.asarray(infer.decode(CONFIG, gen, lm_params, state).tokens[0])
  # Greedy continuation of the masked forward (every generated token alive) predicts the same tokens.
  sequence = np.concatenate([prompt[0], out[:2]])[None]
  alive = jnp.asarray(np.stack([np.isin(np.arange(N + 2), np.concatenate([k[0], [N, N + 1]])) for k in kept]))
  masked, _ = models.forward_in_stages(CONFIG, lm_params, sequence, models.LayerStages(SCHEDULE.layers, _hide_dropped),
                                       alive[:, None])
  np.testing.assert_array_equal(np.argmax(masked[0, N - 1:], axis=-1), out)


def test_prefill_flops_count_each_layers_tokens():
  assert sdtp.prefill_flops(CONFIG, None, N) == sum(layer_matmul_flops(CONFIG, i, N, N) for i in range(4)) + \
      2 * CONFIG.d_model * CONFIG.vocab_size
  per_layer = [N, 32, 26, 20]
  assert sdtp.tokens_per_layer(CONFIG, SCHEDULE, N) == per_layer
  hidden = CONFIG.d_model // 4
  predictors = sum(2 * n * (CONFIG.d_model * hidden + 2 * hidden) for n in per_layer[:3])
  want = sum(layer_matmul_flops(CONFIG, i, n, n) for i, n in enumerate(per_layer))
  assert sdtp.prefill_flops(CONFIG, SCHEDULE, N) == pytest.approx(want + 2 * CONFIG.d_model * CONFIG.vocab_size
                                                                   + predictors)
  assert models.forward_matmul_flops_per_token(CONFIG, N) * N > sdtp.prefill_flops(CONFIG, SCHEDULE, N)


def test_pruned_prefill_composes_with_h2o_eviction(lm_params, predictors):
  """Keep ratio 1 and a budget covering every slot: SDTP + H2O decodes exactly like plain decoding. A real
  schedule and budget: each layer keeps the `recent` latest and the heaviest others among the tokens SDTP kept."""
  prompt, start = _tokens(9, N, batch=2), jnp.zeros((2,), jnp.int32)
  gen = infer.GenerationConfig(max_new_tokens=6)
  plain = infer.decode(CONFIG, gen, lm_params, infer.prefill(CONFIG, gen, lm_params, prompt, start, jax.random.key(0)))
  state = sdtp.prefill_with_eviction(CONFIG, gen, lm_params, prompt, start, jax.random.key(0),
                                     config=sdtp.SDTPConfig(layers=(1, 2, 3), keep_ratio=1.0),
                                     stage_params=predictors, budget=N + gen.max_new_tokens - 1, recent=4)
  np.testing.assert_array_equal(infer.decode(CONFIG, gen, lm_params, state).tokens, plain.tokens)

  budget, recent = 16, 4
  pruned = infer.prefill(CONFIG, gen, lm_params, prompt, start, jax.random.key(0),
                         stages=sdtp.pruning_stages(CONFIG, SCHEDULE, N), stage_params=predictors)
  state = sdtp.prefill_with_eviction(CONFIG, gen, lm_params, prompt, start, jax.random.key(0), config=SCHEDULE,
                                     stage_params=predictors, budget=budget, recent=recent)
  kept_positions = np.asarray(pruned.cache.layers.positions)  # [L, B, T]
  evicted = np.asarray(state.cache.layers.positions)  # [L, B, budget]
  assert evicted.shape[-1] == budget
  for layer in range(CONFIG.n_layers):
    for row in range(2):
      alive = set(kept_positions[layer, row][kept_positions[layer, row] >= 0])
      held = set(evicted[layer, row][evicted[layer, row] >= 0])
      assert held <= alive and len(held) == min(budget, len(alive))
      assert set(range(N - recent, N)) <= held  # the latest prompt tokens are never evicted


HF_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "interop", "fixtures")


@pytest.fixture(scope="module", params=("llama", "qwen2", "qwen3"))
def transformers_checkpoint(request):
  """(config, params, transformers' logits, tokens) of a tiny checkpoint transformers wrote, loaded by
  load_pretrained: biases, tied embeddings, q/k norms and llama3 / linear / yarn RoPE scaling between them."""
  path = os.path.join(HF_FIXTURES, request.param)
  config, params = hf.load_pretrained(path)
  reference = np.load(os.path.join(path, "reference.npz"))
  return config, params, reference["logits"], reference["tokens"]


def test_pruning_a_loaded_checkpoint_matches_transformers_and_the_masked_forward(transformers_checkpoint):
  config, params, want, tokens = transformers_checkpoint
  n = tokens.shape[1]
  whole = sdtp.pruning_stages(config, sdtp.SDTPConfig(layers=(1,), keep_ratio=1.0), n, "attention")
  scorer_params = sdtp.attention_scorer_params(config, sdtp.SDTPConfig(layers=(1,)), params)
  logits, _ = models.forward_in_stages(config, params, tokens, whole, scorer_params)
  np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
  # A real cut by the attention scorer: the gathered forward equals the masked one at the kept tokens.
  schedule = sdtp.SDTPConfig(layers=(1,), keep_ratio=0.6)
  stages, kept = _recording(sdtp.pruning_stages(config, schedule, n, "attention"))
  pruned, state = models.forward_in_stages(config, params, tokens, stages, scorer_params)
  assert kept[0].shape == (2, schedule.keep_counts(n)[0])
  alive = jnp.asarray(np.stack([np.isin(np.arange(n), row) for row in kept[0]]))[None]
  masked, _ = models.forward_in_stages(config, params, tokens, models.LayerStages((1,), _hide_dropped), alive)
  np.testing.assert_allclose(pruned, np.take_along_axis(np.asarray(masked), kept[0][..., None], axis=1), atol=1e-5)
  np.testing.assert_array_equal(state.positions, kept[0])


def test_predictors_train_on_a_loaded_checkpoint_and_it_generates_after_the_pruned_prefill():
  config, params = hf.load_pretrained(os.path.join(HF_FIXTURES, "qwen3"))
  schedule, prompt = sdtp.SDTPConfig(layers=(1,), keep_ratio=0.6), 24
  batch = _batch(10, prompt, 4, vocab=config.vocab_size)
  train_config = TrainConfig(peak_lr=1e-2, warmup_steps=1, total_steps=10, weight_decay=0.0)
  state, step = sdtp.predictor_training(config, schedule, prompt, params, train_config, single_device_mesh(),
                                        jax.random.key(2))
  start, before = jax.tree.map(np.array, state.params), jax.tree.map(np.array, params)
  for _ in range(2):
    state, _ = step(state, batch)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(start)))
  gen = infer.GenerationConfig(max_new_tokens=4)
  prefilled = infer.prefill(config, gen, params, batch["inputs"][:1, :prompt], jnp.zeros((1,), jnp.int32), jax.random.key(0),
                            stages=sdtp.pruning_stages(config, schedule, prompt), stage_params=state.params)
  np.testing.assert_array_equal(prefilled.cache.lengths[:, 0], sdtp.tokens_per_layer(config, schedule, prompt))
  np.testing.assert_array_equal(prefilled.cache.next_positions, [prompt])
  assert infer.decode(config, gen, params, prefilled).tokens.shape == (1, 4)
