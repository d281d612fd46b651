"""SlimLLM's importance criteria: whole heads by output correlation, FFN channels in the output's feature space.

SlimLLM: Accurate Structured Pruning for Large Language Models (Guo, Chen, Tang, Wang; ICML 2025, arXiv
2505.22689); details the paper leaves open follow the authors' code (guojialong1/Slimllm). Spec:
shared/specs/slimllm.md, sections 3.3-3.5.

Heads (3.3). With O_i = X_i W_O[i] the share of head i in the attention output O = sum_i O_i, a head matters as
much as the output changes without it: sim_i = sum_d |rho_tokens((O - O_i)[:, d], O[:, d])| (population Pearson
per output channel, the code's form), and the heads with the highest sim are pruned. Everything here is a function
of the per-channel covariances Cov(O_i[:, d], O_j[:, d]) of the heads' shares, accumulated over calibration
tokens (pangu.compress.prune.stats); whole KV groups are scored as the sum of their heads' shares, so `units`
below are heads or groups alike.

Greedy refinement (3.4, Algorithm 1): f(S) = sum_d |rho(sum_{j in S} O_j[:, d], O[:, d])| of the kept set S;
each pruned unit, most prunable first, may swap into the kept slot where f grows most.

FFN channels (3.5). With h the channels, Y = h W_down the FFN output and Sigma = Q diag(M) Q^T its covariance,
score_j = ||W_gate[:, j] * xn|| + ||W_up[:, j] * xn|| + ||h_j|| * || |(W_down Q)[j, :]| * sigmoid(|M| / mean |M|) ||,
xn the column norms of the FFN input: a channel's weight in the directions that carry the output's variance.
"""

import numpy as np

from pangu.compress.prune.stats import Comoment


def unit_output_covariance(head_outputs: Comoment, membership: np.ndarray, correlation: str) -> np.ndarray:
  """[C, U, U] covariances of the units' output shares: one matrix per output channel (C = D, `per_channel`) or
  one over every entry of the [N, D] output (C = 1, `flattened`, one Pearson over N * D numbers).

  head_outputs: the Comoment "nhd,ngd->hgd" of the heads' shares O_h [n, H, D]; membership: [U, H] 0/1.
  """
  cov = np.einsum("uh,hgd,vg->duv", membership, head_outputs.covariance, membership)
  if correlation == "per_channel":
    return cov
  if correlation != "flattened":
    raise ValueError(f"head correlation must be 'per_channel' or 'flattened', got {correlation!r}")
  # Over all N * D entries: the mean within-channel covariance plus the covariance of the channel means.
  means = membership @ head_outputs.mean_a
  means = means - means.mean(axis=1, keepdims=True)
  return (cov.mean(axis=0) + means @ means.T / means.shape[1])[None]


def _abs_pearson_sum(cov_xy: np.ndarray, var_x: np.ndarray, var_y: np.ndarray) -> np.ndarray:
  """sum over the leading axis of |cov| / sqrt(var_x var_y); a constant channel (zero variance) counts 0."""
  den = np.sqrt(np.maximum(var_x, 0) * np.maximum(var_y, 0))
  return np.sum(np.abs(np.divide(cov_xy, den, out=np.zeros_like(cov_xy), where=den > 0)), axis=0)


def head_similarity(cov: np.ndarray) -> np.ndarray:
  """[U] sim_u = sum_c |rho(O - O_u, O)| from the unit covariances [C, U, U]; prune the highest."""
  total = cov.sum(axis=(1, 2))[:, None]  # Var(O), [C, 1]
  with_all = cov.sum(axis=2)  # Cov(O_u, O), [C, U]
  own = np.diagonal(cov, axis1=1, axis2=2)  # Var(O_u)
  return _abs_pearson_sum(total - with_all, total - 2 * with_all + own, np.broadcast_to(total, own.shape))


def kept_similarity(cov: np.ndarray, kept: list[int]) -> float:
  """f(S) = sum_c |rho(sum_{u in S} O_u, O)|, the objective of the greedy refinement."""
  kept_cov = cov[:, kept][:, :, kept].sum(axis=(1, 2))
  return float(_abs_pearson_sum(cov[:, kept].sum(axis=(1, 2)), kept_cov, cov.sum(axis=(1, 2))))


def greedy_refine(cov: np.ndarray, kept: list[int], pruned: list[int], blocks: tuple[int, ...]) -> list[int]:
  """Algorithm 1: for each pruned unit in order, the swap into a kept slot of its block that raises f(S) most is
  made if it beats the best f so far; the swapped-out unit stays pruned (as in the authors' code)."""
  kept = list(kept)
  best = kept_similarity(cov, kept)
  for p in pruned:
    choice = None
    for slot, unit in enumerate(kept):
      if blocks[unit] != blocks[p]:
        continue
      trial = kept[:slot] + [p] + kept[slot + 1:]
      value = kept_similarity(cov, trial)
      if value > best:
        best, choice = value, trial
    if choice is not None:
      kept = choice
  return sorted(kept)


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1 / (1 + np.exp(-x))


def ffn_scores(mlp: dict, output_cov: np.ndarray | None, hidden_sq: np.ndarray, input_sq: np.ndarray,
               importance: str) -> np.ndarray:
  """[F] channel scores (prune the lowest).

  Args:
    mlp: the layer's FFN params in the training layout: gate [D, F] (absent for GELU), up [D, F], down [F, D].
    output_cov: [D, D] covariance of the FFN output Y (its scale does not matter; unused by `plain`).
    hidden_sq: [F] sum over tokens of h_j^2; input_sq: [D] sum over tokens of the FFN input's x_k^2.
    importance: `feature_space` (PCA eigen-weighted down term) or `plain` (||h_j|| ||W_down[j, :]||).
  """
  down = np.asarray(mlp["down"], np.float64)
  hidden_norm = np.sqrt(hidden_sq)
  if importance == "feature_space":
    eigenvalues, eigenvectors = np.linalg.eigh(output_cov)
    magnitude = np.abs(eigenvalues)
    weights = _sigmoid(magnitude / magnitude.mean())
    score = hidden_norm * np.linalg.norm(np.abs(down @ eigenvectors) * weights, axis=1)
  elif importance == "plain":
    score = hidden_norm * np.linalg.norm(down, axis=1)
  else:
    raise ValueError(f"ffn importance must be 'feature_space' or 'plain', got {importance!r}")
  input_norm = np.sqrt(input_sq)[:, None]
  for name in ("gate", "up"):
    if name in mlp:
      score = score + np.linalg.norm(np.asarray(mlp[name], np.float64) * input_norm, axis=0)
  return score
