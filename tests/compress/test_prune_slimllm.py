"""SlimLLM's criteria against float64 NumPy transcriptions of the spec (shared/specs/slimllm.md 3.3-3.5) computed
from the raw activations, the way the authors' code does, on random data."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from pangu.compress.prune import slimllm
from pangu.compress.prune.stats import Comoment

N, H, DH, D, F = 96, 4, 3, 5, 12


def _head_shares(seed=0):
  """O_h = X_h W_O[h], [H, N, D], from correlated random heads (float32-exact values)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, H, DH)) + 0.5 * rng.normal(size=(N, 1, DH)) + rng.normal(size=(H, DH))
  o = rng.normal(size=(H, DH, D))
  shares = np.einsum("nhc,hcd->hnd", x, o)
  return shares.astype(np.float32).astype(np.float64)


def _streamed(shares):
  moments = Comoment("nhd,ngd->hgd")
  for rows in np.array_split(np.arange(N), 3):
    moments.add(jnp.asarray(shares[:, rows].transpose(1, 0, 2), jnp.float32))
  return moments


def _pearson(a, b):
  a, b = a - a.mean(), b - b.mean()
  return (a * b).mean() / (a.std() * b.std())


def _numpy_similarity(shares, correlation):
  """sum_d |rho((O - O_u)[:, d], O[:, d])| per unit (per_channel) or one |rho| over all entries (flattened)."""
  total = shares.sum(0)
  out = []
  for share in shares:
    rest = total - share
    if correlation == "per_channel":
      out.append(sum(abs(_pearson(rest[:, d], total[:, d])) for d in range(D)))
    else:
      out.append(abs(_pearson(rest.ravel(), total.ravel())))
  return np.array(out)


@pytest.mark.parametrize("correlation", ["per_channel", "flattened"])
@pytest.mark.parametrize("grouped", [False, True])
def test_head_similarity_equals_numpy(correlation, grouped):
  shares = _head_shares()
  membership = np.kron(np.eye(H // 2), np.ones((1, 2))) if grouped else np.eye(H)
  cov = slimllm.unit_output_covariance(_streamed(shares), membership, correlation)
  want = _numpy_similarity(np.einsum("uh,hnd->und", membership, shares), correlation)
  np.testing.assert_allclose(slimllm.head_similarity(cov), want, rtol=1e-5)


def _numpy_objective(shares, kept):
  total = shares.sum(0)
  kept_sum = shares[list(kept)].sum(0)
  return sum(abs(_pearson(kept_sum[:, d], total[:, d])) for d in range(D))


def _numpy_greedy(shares, kept, pruned, blocks):
  """Algorithm 1 as in the authors' code, on the raw shares."""
  best = _numpy_objective(shares, kept)
  for p in pruned:
    choice = None
    for slot in range(len(kept)):
      if blocks[kept[slot]] != blocks[p]:
        continue
      trial = kept[:slot] + [p] + kept[slot + 1:]
      value = _numpy_objective(shares, trial)
      if value > best:
        best, choice = value, trial
    if choice is not None:
      kept = choice
  return sorted(kept)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_refinement_equals_numpy_and_never_lowers_the_objective(seed):
  shares = _head_shares(seed)
  cov = slimllm.unit_output_covariance(_streamed(shares), np.eye(H), "per_channel")
  sim = slimllm.head_similarity(cov)
  pruned = [int(u) for u in np.argsort(-sim)[:2]]  # the two highest similarities, most prunable first
  kept = sorted(set(range(H)) - set(pruned))
  blocks = (0,) * H
  refined = slimllm.greedy_refine(cov, kept, pruned, blocks)
  assert refined == _numpy_greedy(shares, kept, pruned, blocks)
  assert _numpy_objective(shares, refined) >= _numpy_objective(shares, kept) - 1e-9
  np.testing.assert_allclose(slimllm.kept_similarity(cov, refined), _numpy_objective(shares, refined), rtol=1e-5)


def test_greedy_refinement_finds_the_best_swap_when_one_exists():
  # Heads 0 and 1 cancel each other: dropping both changes the output least, but any one of them alone ruins
  # it; the per-head ranking prunes one of them, the swap search fixes that.
  rng = np.random.default_rng(0)
  base = rng.normal(size=(N, D))
  shares = np.stack([5 * base, -5 * base + 0.01 * rng.normal(size=(N, D)), rng.normal(size=(N, D)),
                     rng.normal(size=(N, D))]).astype(np.float32).astype(np.float64)
  cov = slimllm.unit_output_covariance(_streamed(shares), np.eye(H), "per_channel")
  best = max(itertools.combinations(range(H), 2), key=lambda s: _numpy_objective(shares, s))
  refined = slimllm.greedy_refine(cov, [0, 2], [1, 3], (0,) * H)
  assert tuple(refined) == best == (2, 3)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _numpy_ffn_scores(x, mlp, importance):
  """The authors' LlamaMLP.compress score: np.linalg.eig of the uncentred-scale covariance, as they run it."""
  gate, up, down = mlp["gate"], mlp["up"], mlp["down"]
  pre = x @ gate
  h = pre / (1 + np.exp(-pre)) * (x @ up)
  y = h @ down
  xn = np.linalg.norm(x, axis=0)[None]
  hn = np.linalg.norm(h, axis=0)[:, None]
  if importance == "feature_space":
    centred = y - y.mean(0, keepdims=True)
    eigenvalues, eigenvectors = np.linalg.eig(centred.T @ centred)
    weights = _sigmoid(np.abs(eigenvalues) / np.abs(eigenvalues).mean())
    i_down = np.linalg.norm(np.abs(down @ eigenvectors) * weights[None] * hn, axis=-1)
  else:
    i_down = np.linalg.norm(down * hn, axis=-1)
  return np.linalg.norm(gate.T * xn, axis=-1) + np.linalg.norm(up.T * xn, axis=-1) + i_down


@pytest.mark.parametrize("importance", ["feature_space", "plain"])
def test_ffn_scores_equal_numpy(importance):
  rng = np.random.default_rng(3)
  f32 = lambda a: a.astype(np.float32).astype(np.float64)
  x = f32(rng.normal(size=(N, D)) + 0.3)
  mlp = {"gate": f32(rng.normal(size=(D, F))), "up": f32(rng.normal(size=(D, F))), "down": f32(rng.normal(size=(F, D)))}
  pre = x @ mlp["gate"]
  h = pre / (1 + np.exp(-pre)) * (x @ mlp["up"])
  hidden, ffn_input, output = Comoment("nc,nc->c"), Comoment("nc,nc->c"), Comoment("ni,nj->ij")
  for rows in np.array_split(np.arange(N), 4):
    hidden.add(jnp.asarray(h[rows], jnp.float32))
    ffn_input.add(jnp.asarray(x[rows], jnp.float32))
    output.add(jnp.asarray(h[rows] @ mlp["down"], jnp.float32))
  got = slimllm.ffn_scores(mlp, output.covariance, hidden.count * hidden.second_moment,
                           ffn_input.count * ffn_input.second_moment, importance)
  np.testing.assert_allclose(got, _numpy_ffn_scores(x, mlp, importance), rtol=1e-4)
