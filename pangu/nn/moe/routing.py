"""Routers and routing statistics: plain top-K, group-limited top-K, MoGE, balance losses, Imbalance Score.

Pangu Pro MoE (arXiv 2505.21411). T tokens, N experts, M groups of G = N / M contiguous expert ids, K experts
per token, K' = K / M per group.

Every router returns `(weights [T, K] float32, expert_ids [T, K] int32)`. Ties break towards the lowest expert
id (`jax.lax.top_k` is stable), so sharded and single-device runs select the same experts. MoGE also runs as
the fused Pallas kernel of `pangu_kernels.moe_routing` (`MoEConfig.routing_implementation`).
"""

import functools

import jax
import jax.numpy as jnp

from pangu.nn.moe.config import MoEConfig
from pangu_kernels import moe_routing
from pangu_kernels.moe_routing.pallas import DEFAULT_BLOCK_TOKENS


def topk_route(logits: jax.Array, *, k: int) -> tuple[jax.Array, jax.Array]:
  """Standard top-K (Eq. 1-2): the K largest logits, softmax over those K only; the others weigh 0."""
  top_logits, expert_ids = jax.lax.top_k(logits.astype(jnp.float32), k)
  return jax.nn.softmax(top_logits, axis=-1), expert_ids.astype(jnp.int32)


def sigmoid_topk_route(logits: jax.Array, *, k: int) -> tuple[jax.Array, jax.Array]:
  """Pangu Ultra MoE's gate (the openPangu modeling code; DeepSeek-V3's without its bias correction): scores
  sigmoid(logits), the K largest, divided by their sum."""
  scores, expert_ids = jax.lax.top_k(jax.nn.sigmoid(logits.astype(jnp.float32)), k)
  return scores / (scores.sum(axis=-1, keepdims=True) + 1e-20), expert_ids.astype(jnp.int32)


def group_limited_route(logits: jax.Array, *, num_groups: int, topk_groups: int,
                        k: int) -> tuple[jax.Array, jax.Array]:
  """DeepSeek-V2's group-limited top-K, the baseline MoGE is compared with.

  1. S = softmax over all N experts. 2. Score each group by its largest S. 3. Keep the `topk_groups` best
  groups. 4. Take the K largest S among their experts; the weights are those global S (not renormalised).
  A token may still pile all K experts into one group, so devices are not balanced per token.
  """
  t, n = logits.shape
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  grouped = probs.reshape(t, num_groups, n // num_groups)
  _, best_groups = jax.lax.top_k(grouped.max(axis=-1), topk_groups)
  keep = jnp.zeros((t, num_groups), bool).at[jnp.arange(t)[:, None], best_groups].set(True)
  masked = jnp.where(keep[:, :, None], grouped, -1.0).reshape(t, n)
  _, expert_ids = jax.lax.top_k(masked, k)
  return jnp.take_along_axis(probs, expert_ids, axis=-1), expert_ids.astype(jnp.int32)


def moge_route(logits: jax.Array, *, num_groups: int, k_per_group: int) -> tuple[jax.Array, jax.Array]:
  """Mixture of Grouped Experts (Eq. 5-7): logits [T, N] -> (weights, expert_ids), each [T, M * K'].

  1. S = softmax(logits) over all N experts, in float32, *before* any selection.
  2. View S as [T, M, G]: expert e belongs to group e // G.
  3. Top-K' inside every group; the weight of a chosen expert is its global S.
  4. No renormalisation: the weights of a token sum to less than 1.
  Every token therefore uses exactly K' experts of every group, which is what makes the per-device load
  constant once groups map onto devices. The columns are ordered by group, then by rank inside the group.
  """
  t, n = logits.shape
  if n % num_groups:
    raise ValueError(f"moge_route: {n} experts are not divisible by num_groups={num_groups}")
  group_size = n // num_groups
  if not 1 <= k_per_group <= group_size:
    raise ValueError(f"moge_route: k_per_group={k_per_group} must be in [1, group size {group_size}]")
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, local = jax.lax.top_k(probs.reshape(t, num_groups, group_size), k_per_group)
  expert_ids = local + (jnp.arange(num_groups, dtype=local.dtype) * group_size)[None, :, None]
  return weights.reshape(t, -1), expert_ids.reshape(t, -1).astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def pallas_moge_route(logits: jax.Array, num_groups: int, k_per_group: int) -> tuple[jax.Array, jax.Array]:
  """`moge_route` by the fused Pallas kernel (interpreted on CPU): the same weights and ids, differentiable.

  The kernel has no VJP. Its weights are the global softmax at the chosen ids, so the backward pass is that of
  `take_along_axis(softmax(logits), expert_ids)`, recomputed from the saved logits. A custom VJP rather than the
  straight-through `reference + stop_gradient(kernel - reference)`: the forward pass runs the kernel alone
  (the straight-through form adds an XLA softmax over all N experts to every call, inference included).
  """
  routed = moe_routing.moge_routing(logits, num_groups=num_groups, k_per_group=k_per_group,
                                    implementation="pallas")
  return routed.weights, routed.expert_ids


def _pallas_moge_route_forward(logits, num_groups, k_per_group):
  weights, expert_ids = pallas_moge_route(logits, num_groups, k_per_group)
  return (weights, expert_ids), (logits, expert_ids)


def _pallas_moge_route_backward(num_groups, k_per_group, residuals, cotangents):
  logits, expert_ids = residuals
  gathered = lambda l: jnp.take_along_axis(jax.nn.softmax(l.astype(jnp.float32), axis=-1), expert_ids, axis=-1)
  return jax.vjp(gathered, logits)[1](cotangents[0])


pallas_moge_route.defvjp(_pallas_moge_route_forward, _pallas_moge_route_backward)


def resolve_routing_implementation(config: MoEConfig) -> str:
  """`config.routing_implementation` with `auto` resolved: the MoGE kernel where it compiles, else `xla`."""
  if config.routing_implementation != "auto":
    return config.routing_implementation
  kernel = config.router == "moge" and moe_routing.pallas_supported(config.num_experts, config.top_k,
                                                                    DEFAULT_BLOCK_TOKENS)
  return "pallas" if kernel else "xla"


def route(logits: jax.Array, config: MoEConfig,
          router_scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The configured router and routing implementation; `routed_scaling_factor` and `router_scale` [N]
  (optional) multiply each selected weight, the latter by scale[id]."""
  if config.router == "moge":
    moge = pallas_moge_route if resolve_routing_implementation(config) == "pallas" else moge_route
    weights, expert_ids = moge(logits, num_groups=config.num_groups, k_per_group=config.k_per_group)
  elif config.router == "group_limited":
    weights, expert_ids = group_limited_route(logits, num_groups=config.num_groups,
                                              topk_groups=config.topk_groups, k=config.top_k)
  elif config.router == "sigmoid_topk":
    weights, expert_ids = sigmoid_topk_route(logits, k=config.top_k)
  else:
    weights, expert_ids = topk_route(logits, k=config.top_k)
  if config.routed_scaling_factor != 1.0:
    weights = weights * config.routed_scaling_factor
  if router_scale is not None:
    weights = weights * router_scale.astype(jnp.float32)[expert_ids]
  return weights, expert_ids


def balance_scores(logits: jax.Array, *, num_groups: int, aux_scores: str = "global") -> jax.Array:
  """The scores S [T, N] of the balance loss: the global softmax (the paper) or a softmax inside each group."""
  logits = logits.astype(jnp.float32)
  if aux_scores == "global":
    return jax.nn.softmax(logits, axis=-1)
  t, n = logits.shape
  return jax.nn.softmax(logits.reshape(t, num_groups, n // num_groups), axis=-1).reshape(t, n)


def expert_load(expert_ids: jax.Array, *, num_experts: int) -> jax.Array:
  """[N] float32: token -> expert assignments each expert receives."""
  return jnp.zeros((num_experts,), jnp.float32).at[expert_ids.reshape(-1)].add(1.0)


def device_load(expert_ids: jax.Array, *, num_experts: int, num_devices: int) -> jax.Array:
  """[num_devices] float32: T_i, assignments handled by device i when experts are split in contiguous blocks."""
  if num_experts % num_devices:
    raise ValueError(f"device_load: num_experts={num_experts} is not divisible by num_devices={num_devices}")
  return expert_load(expert_ids, num_experts=num_experts).reshape(num_devices, -1).sum(axis=-1)


def imbalance_score(expert_ids: jax.Array, *, num_experts: int, num_devices: int) -> jax.Array:
  """Imbalance Score (Eq. 3): IS(X) = (max_i T_i - min_i T_i) / |X|, a float32 scalar.

  expert_ids [T, K] are the experts of the batch X (|X| = T tokens); T_i counts the assignments of device i,
  whose experts are the i-th contiguous block of N / num_devices ids.
  """
  load = device_load(expert_ids, num_experts=num_experts, num_devices=num_devices)
  return (load.max() - load.min()) / expert_ids.shape[0]


def balance_loss(scores: jax.Array, expert_ids: jax.Array, *, top_k: int, token_groups: int = 1) -> jax.Array:
  """Balance loss sum_i f_i p_i, without the coefficient alpha, averaged over `token_groups` contiguous groups.

  Per group B of tokens: f_i = N / (K |B|) * (assignments to expert i), p_i = (1 / |B|) sum_{t in B} S_{i,t}.
  One group is Pro MoE's batch-level loss over every token (under jit with sharded arrays the means are already
  global); more groups balance each group on its own (EP group, device). K is the total experts per token, not
  K'. Gradients flow through p only. Uniform routing gives f_i = 1, p_i = 1 / N, so the loss is 1.
  """
  t, n = scores.shape
  if t % token_groups:
    raise ValueError(f"balance_loss: {t} tokens do not split into token_groups={token_groups} equal groups")
  size = t // token_groups
  ids = expert_ids.reshape(token_groups, -1)
  counts = jax.vmap(lambda group: expert_load(group, num_experts=n))(ids)
  f = jax.lax.stop_gradient(counts) * n / (top_k * size)
  p = scores.reshape(token_groups, size, n).mean(axis=1)
  return jnp.mean(jnp.sum(f * p, axis=-1))


def router_z_loss(logits: jax.Array) -> jax.Array:
  """mean_t logsumexp(logits_t)^2 (ST-MoE): keeps router logits small so the float32 softmax stays exact."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))
