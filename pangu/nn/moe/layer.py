"""The sparse feed-forward layer: router -> routed SwiGLU experts (+ always-on shared experts), with metrics.

Pangu Pro MoE (arXiv 2505.21411), Eq. 7: y = sum_{i in top} w_i E_i(h) + shared(h).

Metrics go to the `moe` variable collection (`MOE_COLLECTION`) with `self.sow`, one entry per layer;
`moe_metrics` folds them into step metrics and the auxiliary losses the train step adds to its loss:

  aux_loss           alpha * sum_i f_i p_i (already scaled by aux_loss_coef)
  router_z_loss      router_z_loss_coef * mean(logsumexp(logits)^2)
  expert_load [N]    assignments per expert
  device_load [P]    assignments per device T_i: under expert parallelism, what the exchange delivered to each
                     expert device (capacity drops excluded); without it, from the router ids per group
  imbalance_score    (max_i T_i - min_i T_i) / T (Eq. 3)
  dropped            assignments the capacity variant dropped (0 when dropless)
"""

from collections.abc import Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from pangu.nn import linear
from pangu.nn.moe import offload, parallel, routing
from pangu.nn.moe.config import MoEConfig
from pangu.nn.moe.experts import ExpertWeights, capacity_experts, routed_experts, swiglu
from pangu.parallel import rules

MOE_COLLECTION = "moe"
# Rank of one layer's value of each metric.
METRIC_RANKS = {"aux_loss": 0, "router_z_loss": 0, "imbalance_score": 0, "dropped": 0, "expert_load": 1,
                "device_load": 1}

Initializer = jax.nn.initializers.Initializer


class MoEFeedForward(nn.Module):
  """x [B, S, D] -> [B, S, D].

  1. Router logits = x W_r in float32 (W_r [D, N], no bias); route with `config.router`.
  2. Routed experts: one `jax.shard_map` exchange under expert parallelism (`parallel.py`), else the
     dropless grouped matmul or the capacity variant on the local device, or, with experts kept in host
     memory, a copy-in of the selected experts (`offload.py`).
  3. Add the shared experts, one SwiGLU of width num_shared_experts * expert_dim.
  4. Sow the losses and load metrics into `MOE_COLLECTION`.

  Attributes:
    config: the layer's MoEConfig.
    d_model: D.
    kernel_init: initialiser of the router, gate and up kernels.
    output_init: initialiser of the down kernels (residual-branch outputs).
    dtype: compute dtype; the router softmax always runs in float32.
    param_dtype: parameter dtype.
  """

  config: MoEConfig
  d_model: int
  kernel_init: Initializer = jax.nn.initializers.normal(0.02)
  output_init: Initializer = jax.nn.initializers.normal(0.02)
  dtype: str = "float32"
  param_dtype: str = "float32"

  def _param(self, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...], init: Initializer):
    return self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(self.param_dtype))

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    chex.assert_rank(x, 3)
    chex.assert_axis_dimension(x, 2, self.d_model)
    b, s, d = x.shape
    n, f = cfg.num_experts, cfg.expert_dim
    tokens = x.reshape(b * s, d)

    router = self._param("router", (d, n), (rules.EMBED, None), self.kernel_init)
    logits = linear.weight_einsum("td,dn->tn", tokens.astype(jnp.float32), router.astype(jnp.float32))
    scale = self._param("router_scale", (n,), (None,), jax.nn.initializers.ones) if cfg.router_scale else None
    weights, expert_ids = routing.route(logits, cfg, scale)

    experts = ExpertWeights(
        gate=self._param("gate", (n, d, f), (rules.EXPERT, rules.EMBED, rules.MLP), self.kernel_init),
        up=self._param("up", (n, d, f), (rules.EXPERT, rules.EMBED, rules.MLP), self.kernel_init),
        down=self._param("down", (n, f, d), (rules.EXPERT, rules.MLP, rules.EMBED), self.output_init))
    tokens = tokens.astype(self.dtype)
    # Initialisation sees a dummy batch that need not split over the mesh; the parameters are the same.
    layout = None if self.is_initializing() else parallel.current_layout(cfg)
    dropped, received = jnp.zeros((), jnp.int32), None
    if cfg.expert_storage == "host" and not self.is_initializing():
      if layout is not None:
        raise ValueError("MoEConfig.expert_storage='host' is single-device inference, without expert parallelism")
      y = offload.offloaded_experts(tokens, weights, expert_ids, experts, self.dtype)
    else:
      experts = ExpertWeights(*(w.astype(self.dtype) for w in experts))
      if layout is not None:
        y, dropped, received = parallel.expert_parallel_experts(tokens, weights, expert_ids, experts, config=cfg,
                                                                layout=layout)
      elif cfg.dispatch == "capacity":
        y, dropped = capacity_experts(tokens, weights, expert_ids, experts, capacity_factor=cfg.capacity_factor)
      else:
        y = routed_experts(tokens, weights, expert_ids, experts, implementation=cfg.experts_implementation)

    if cfg.num_shared_experts:
      shared = (self._param("shared_gate", (d, cfg.shared_dim), (rules.EMBED, rules.MLP), self.kernel_init),
                self._param("shared_up", (d, cfg.shared_dim), (rules.EMBED, rules.MLP), self.kernel_init),
                self._param("shared_down", (cfg.shared_dim, d), (rules.MLP, rules.EMBED), self.output_init))
      y = y + swiglu(tokens, *(w.astype(self.dtype) for w in shared))

    num_devices = layout.num_devices if layout is not None else cfg.num_groups
    self._sow_metrics(logits, expert_ids, dropped, received, num_devices)
    return y.reshape(b, s, d)

  def _sow_metrics(self, logits: jax.Array, expert_ids: jax.Array, dropped: jax.Array, received: jax.Array | None,
                   num_devices: int) -> None:
    cfg = self.config
    scores = routing.balance_scores(logits, num_groups=cfg.num_groups, aux_scores=cfg.aux_scores)
    n = cfg.num_experts
    values = {
        "aux_loss": cfg.aux_loss_coef * routing.balance_loss(
            scores, expert_ids, top_k=cfg.top_k,
            token_groups=1 if self.is_initializing() else parallel.balance_token_groups(cfg)),
        "router_z_loss": cfg.router_z_loss_coef * routing.router_z_loss(logits),
        "imbalance_score": routing.imbalance_score(expert_ids, num_experts=n, num_devices=num_devices),
        "dropped": dropped,
        "expert_load": routing.expert_load(expert_ids, num_experts=n),
        "device_load": (routing.device_load(expert_ids, num_experts=n, num_devices=num_devices)
                        if received is None else received),
    }
    for name, value in values.items():
      self.sow(MOE_COLLECTION, name, value)


def moe_metrics(collection: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Folds the `moe` collection of every MoE layer (scanned or unrolled) into step metrics.

  Returns:
    aux_loss, router_z_loss: sums over layers (add them to the training loss).
    imbalance_score: mean over layers.
    dropped: assignments dropped, summed over layers.
    expert_load [L, N], device_load [L, P]: per MoE layer.
    max_over_mean_device_load: sum_l max_i T_{l,i} / sum_l mean_i T_{l,i}: the step's slowdown when every layer
      waits for its busiest device (1.0 = perfectly balanced).
  """
  per_layer = {name: [] for name in METRIC_RANKS}
  for path, leaf in jax.tree_util.tree_flatten_with_path(collection)[0]:
    name = path[-2].key  # sow stores a tuple per name: path [..., name, index]
    rank = METRIC_RANKS[name]
    per_layer[name].append(leaf.reshape(-1, *leaf.shape[leaf.ndim - rank:]))
  if not per_layer["aux_loss"]:
    raise ValueError(f"no MoE layer sowed metrics into the {MOE_COLLECTION!r} collection")
  stacked = {name: jnp.concatenate(values) for name, values in per_layer.items()}
  load = stacked["device_load"]
  return {
      "aux_loss": stacked["aux_loss"].sum(),
      "router_z_loss": stacked["router_z_loss"].sum(),
      "imbalance_score": stacked["imbalance_score"].mean(),
      "dropped": stacked["dropped"].sum(),
      "expert_load": stacked["expert_load"],
      "device_load": load,
      "max_over_mean_device_load": load.max(axis=1).sum() / jnp.maximum(load.mean(axis=1).sum(), 1.0),
  }
