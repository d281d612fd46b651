"""Merging formulas against float64 NumPy references written from mergekit's definitions, plus invariants:
identical models merge to themselves, TIES at density 1 on one model is task arithmetic, E[DARE] = tau,
accumulate == task-vector accumulation, dtypes kept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu.reason import merging


def _trees(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  make = lambda: {"a": rng.normal(size=(4, 6)).astype(np.float32), "b": {"c": rng.normal(size=(5,)).astype(np.float32)}}
  base = make()
  return base, [make() for _ in range(n)]


def _np_trim(delta, density):
  flat = delta.reshape(-1)
  k = int(np.ceil(density * flat.size))
  keep = np.argsort(-np.abs(flat), kind="stable")[:k]
  out = np.zeros_like(flat)
  out[keep] = flat[keep]
  return out.reshape(delta.shape)


def _np_ties(base, models, weights, density, scale):
  deltas = np.stack([w * _np_trim(m - base, density) for w, m in zip(weights, models)])
  gamma = np.sign(deltas.sum(0))
  agree = (np.sign(deltas) == gamma) & (deltas != 0)
  w = np.broadcast_to(np.asarray(weights).reshape(-1, *[1] * base.ndim), deltas.shape)
  total = (w * agree).sum(0)
  mean = np.divide((deltas * agree).sum(0), total, out=np.zeros_like(base), where=total > 0)
  return base + scale * mean


def _leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("weights", [None, [0.2, 0.5, 0.3]])
def test_linear_and_task_arithmetic_match_numpy(weights):
  base, models = _trees(3)
  w = np.ones(3) if weights is None else np.asarray(weights)
  got = merging.linear([jax.tree.map(jnp.asarray, m) for m in models], weights)
  for i, leaf in enumerate(_leaves(got)):
    ref = sum(wi * _leaves(m)[i] for wi, m in zip(w, models)) / w.sum()
    np.testing.assert_allclose(leaf, ref, rtol=1e-5, atol=1e-6)
  got = merging.task_arithmetic(base, models, weights, scale=0.7)
  for i, leaf in enumerate(_leaves(got)):
    b = _leaves(base)[i]
    ref = b + 0.7 * sum(wi * (_leaves(m)[i] - b) for wi, m in zip(w, models))
    np.testing.assert_allclose(leaf, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_ties_matches_numpy(density):
  base, models = _trees(3, seed=1)
  weights = [1.0, 0.5, 2.0]
  got = merging.ties(base, models, weights, density=density, scale=0.8)
  for i, leaf in enumerate(_leaves(got)):
    ref = _np_ties(_leaves(base)[i], [_leaves(m)[i] for m in models], weights, density, 0.8)
    np.testing.assert_allclose(leaf, ref, rtol=1e-5, atol=1e-6)


def test_trim_keeps_top_fraction():
  x = jnp.asarray([0.1, -3.0, 2.0, -0.5, 0.0, 1.0])
  np.testing.assert_array_equal(merging.trim(x, 0.5), [0, -3.0, 2.0, 0, 0, 1.0])


def test_identities():
  base, (model,) = _trees(1, seed=2)
  for merged in (merging.linear([model, model]), merging.ties(model, [model, model]), merging.accumulate(model, model),
                 merging.task_arithmetic(model, [model])):
    for a, b in zip(_leaves(merged), _leaves(model)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  # TIES at density 1 on one model is task arithmetic
  for a, b in zip(_leaves(merging.ties(base, [model], density=1.0)), _leaves(merging.task_arithmetic(base, [model]))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # accumulate == merged + alpha (new - merged) == (1-alpha) merged + alpha new
  for a, b, m in zip(_leaves(merging.accumulate(base, model, 0.3)), _leaves(base), _leaves(model)):
    np.testing.assert_allclose(a, b + 0.3 * (m - b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, 0.7 * b + 0.3 * m, rtol=1e-5, atol=1e-6)


def test_dare_is_unbiased_and_matches_its_mask():
  base = {"w": jnp.zeros((2000,))}
  model = {"w": jnp.linspace(-1, 1, 2000)}
  draws = np.stack([np.asarray(merging.dare(base, [model], jax.random.key(i), density=0.3)["w"]) for i in range(100)])
  kept = draws != 0
  assert abs(kept.mean() - 0.3) < 0.01
  nonzero = np.asarray(model["w"]) != 0
  np.testing.assert_allclose(draws[kept], np.broadcast_to(np.asarray(model["w"]) / 0.3, draws.shape)[kept], rtol=1e-5)
  assert np.abs(draws.mean(0) - np.asarray(model["w"]))[nonzero].mean() < 0.12  # Monte-Carlo E[tau~] = tau
  # dare_ties with density 1 drops nothing: it is TIES without the trim
  base2, models2 = _trees(2, seed=4)
  for a, b in zip(_leaves(merging.dare(base2, models2, jax.random.key(0), density=1.0, sign_consensus=True)),
                  _leaves(merging.ties(base2, models2, density=1.0))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dtypes_kept_and_bad_input():
  base = {"w": jnp.ones((3,), jnp.bfloat16)}
  model = {"w": jnp.full((3,), 3.0, jnp.bfloat16)}
  assert merging.accumulate(base, model)["w"].dtype == jnp.bfloat16
  assert merging.ties(base, [model])["w"].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="different param tree"):
    merging.linear([base, {"v": base["w"]}])
  with pytest.raises(ValueError, match="weights for 2 models"):
    merging.linear([base, model], [1.0])
  with pytest.raises(ValueError, match="MergeConfig.density"):
    merging.MergeConfig(density=0.0)
  with pytest.raises(ValueError, match="PRNG key"):
    merging.merge_iteration(merging.MergeConfig(method="dare_ties"), base, model, base=base)


def test_merge_iteration_methods():
  base, models = _trees(2, seed=5)
  merged = merging.merge_iteration(merging.MergeConfig(), models[0], models[1])
  for a, m0, m1 in zip(_leaves(merged), _leaves(models[0]), _leaves(models[1])):
    np.testing.assert_allclose(a, 0.5 * m0 + 0.5 * m1, rtol=1e-5, atol=1e-6)
  assert merging.merge_iteration(merging.MergeConfig(method="none"), models[0], models[1]) is models[1]
  fixed = merging.merge_iteration(merging.MergeConfig(method="task_arithmetic"), None, models[1], base=base,
                                  history=[models[0]])
  for a, b, m0, m1 in zip(_leaves(fixed), _leaves(base), _leaves(models[0]), _leaves(models[1])):
    np.testing.assert_allclose(a, b + 0.5 * ((m0 - b) + (m1 - b)), rtol=1e-5, atol=1e-6)
