"""Expert load imbalance: how much longer the most loaded expert-parallel device works than the average one.

Step time follows the straggler (Pangu Pro MoE §2.1: the busiest device sets the pace of every all-to-all).
We sample device loads T_i from the routing rule, as Pro MoE's Imbalance Score study does (Eq. 3-4): each
token's experts are drawn uniformly (our reading of "random routing"; top-K never repeats an expert), then

    straggler factor = E[max_i T_i] / mean_i T_i      over P expert-parallel devices.

Routers, with experts in contiguous blocks of N / P per device:
- top-K (and group-limited, approximated as top-K): K distinct experts out of N. Per token, the number landing
  on each device is multivariate hypergeometric (K draws from P colours of N / P), so one draw per token
  samples the device loads exactly, without materialising [T, N] scores. Above `EXACT_TOKENS` tokens the sum
  over tokens is drawn from its normal limit with the same mean and covariance (central limit theorem), which
  keeps a full plan search fast.
- MoGE (Eq. 5-7): K' experts out of each of the M groups. A device that holds whole groups gets exactly
  K' · (its groups) per token, so the factor is 1; when P > M a group spans P / M devices and is sampled the
  same hypergeometric way.
Uniform routing is the optimistic case for top-K: a trained router's skew adds to it (ours; not modelled).
"""

from __future__ import annotations

import functools

import numpy as np

from pangu.nn.moe.config import MoEConfig


EXACT_TOKENS = 1024


def _hypergeometric_loads(rng: np.random.Generator, experts_per_device: int, devices: int, picks: int,
                          tokens: int) -> np.ndarray:
  """[devices] assignments when each of `tokens` tokens picks `picks` distinct experts among `devices` blocks.

  One token's counts have mean picks / P and covariance c (I − 11ᵀ / P) / P with c = picks (N − picks) / (N − 1)
  (multivariate hypergeometric, N = experts_per_device · P); the normal limit of the sum is
  mean + sqrt(tokens · c / P) (z − z̄) with z ~ N(0, I).
  """
  if tokens <= EXACT_TOKENS:
    colours = np.full(devices, experts_per_device, dtype=np.int64)
    return rng.multivariate_hypergeometric(colours, picks, size=tokens, method="marginals").sum(axis=0)
  n = experts_per_device * devices
  spread = np.sqrt(tokens * picks * (n - picks) / (n - 1) / devices)
  z = rng.standard_normal(devices)
  return tokens * picks / devices + spread * (z - z.mean())


def sample_device_loads(moe: MoEConfig, ep: int, tokens: int, rng: np.random.Generator) -> np.ndarray:
  """One sample of T_i [ep]: assignments per expert-parallel device for a batch of `tokens` tokens."""
  if moe.num_experts % ep:
    raise ValueError(f"ep={ep} does not divide num_experts={moe.num_experts}")
  per_device = moe.num_experts // ep
  if moe.router != "moge":
    return _hypergeometric_loads(rng, per_device, ep, moe.top_k, tokens)
  groups, k_group = moe.num_groups, moe.k_per_group
  if groups % ep == 0:  # whole groups on every device: exactly balanced
    return np.full(ep, tokens * k_group * (groups // ep), dtype=np.int64)
  if ep % groups:
    raise ValueError(f"MoGE with num_groups={groups} over ep={ep}: groups must tile the devices or vice versa")
  spread = ep // groups  # devices per group
  return np.concatenate([_hypergeometric_loads(rng, per_device, spread, k_group, tokens) for _ in range(groups)])


@functools.lru_cache(maxsize=4096)
def straggler_factor(moe: MoEConfig, ep: int, tokens: int, *, samples: int = 32, seed: int = 0) -> float:
  """E[max_i T_i] / mean T_i over `samples` routed batches of `tokens` tokens (1.0 without expert parallelism)."""
  if ep == 1 or tokens == 0:
    return 1.0
  rng = np.random.default_rng(seed)
  mean = tokens * moe.top_k / ep
  peaks = [sample_device_loads(moe, ep, tokens, rng).max() for _ in range(samples)]
  return float(np.mean(peaks) / mean)


@functools.lru_cache(maxsize=4096)
def expected_distinct_experts(num_experts: int, picks_per_token: int, tokens: int) -> float:
  """E[experts used at least once] when `tokens` tokens each pick `picks_per_token` distinct experts uniformly:
  N · (1 − (1 − K / N)^T). Decode reads only these experts' weights."""
  return num_experts * (1.0 - (1.0 - picks_per_token / num_experts) ** tokens)
