"""Configuration of a sparse (mixture-of-experts) feed-forward layer.

Dimension letters: T tokens, D model width, N experts, M expert groups, G = N / M experts per group,
K experts per token, K' = K / M experts per group and token (MoGE), F expert width.
"""

import dataclasses
from typing import Literal

from pangu.config_checks import one_of, positive_ints

Router = Literal["topk", "group_limited", "moge", "sigmoid_topk"]
Dispatch = Literal["dropless", "capacity"]
AuxScores = Literal["global", "group_local"]
BalanceScope = Literal["microbatch", "ep_group", "global_batch"]
ExpertsImplementation = Literal["auto", "ragged", "blocked", "dense", "selected"]
ExpertStorage = Literal["device", "host"]
RoutingImplementation = Literal["auto", "xla", "pallas"]

ROUTERS = ("topk", "group_limited", "moge", "sigmoid_topk")
DISPATCHES = ("dropless", "capacity")
AUX_SCORES = ("global", "group_local")
BALANCE_SCOPES = ("microbatch", "ep_group", "global_batch")
EXPERTS_IMPLEMENTATIONS = ("auto", "ragged", "blocked", "dense", "selected")
EXPERT_STORAGES = ("device", "host")
ROUTING_IMPLEMENTATIONS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """A routed-expert SwiGLU layer with optional always-on shared experts.

  Attributes:
    num_experts: N, routed experts per layer.
    top_k: K, routed experts per token, summed over groups (Pangu Pro MoE: 8).
    expert_dim: F, hidden width of one routed expert (Pro MoE: 1344).
    router: `topk` (softmax over the K largest logits, Pro MoE Eq. 1-2), `group_limited` (DeepSeek-V2: global
      softmax, keep the `topk_groups` groups with the largest expert score, top-K among their experts) or `moge`
      (Pro MoE Eq. 5-7: global softmax, top-K' inside each of the M groups, no renormalisation) or
      `sigmoid_topk` (Pangu Ultra MoE / DeepSeek-V3 without the bias correction: sigmoid of each logit, the K
      largest, renormalised to sum to 1).
    num_groups: M, contiguous blocks of N / M expert ids. MoGE and group-limited routing select within them;
      for every router they are the devices of the load metrics when the layer runs without expert parallelism.
    topk_groups: groups a token may use under `group_limited` routing; unused otherwise.
    num_shared_experts: always-on experts of width `expert_dim` each, run as one SwiGLU of width
      num_shared_experts * expert_dim (the down projection is linear, so the two are equal).
    router_scale: a trainable per-expert scale [N], initialised to ones, on the selected weights (vllm-ascend's
      `router_scale`; not in the paper, so off by default).
    routed_scaling_factor: a constant on every selected weight (openPangu Ultra MoE's `routed_scaling_factor`).
    aux_loss_coef: alpha of the batch-level balance loss alpha * sum_i f_i p_i (spec: 1e-2).
    aux_scores: the p_i of that loss from the `global` softmax over N (the paper's choice) or a `group_local`
      softmax inside each group (the paper's ablation).
    balance_scope: the tokens over which f_i and p_i of that loss are taken, averaging the loss over the groups:
      `global_batch`, every token of the step's call (all devices; Pro MoE's batch-level loss); `ep_group`, the
      tokens of one expert-parallel group (Ultra MoE's EP-group loss; the formula is our reading of the spec);
      `microbatch`, each device's own tokens. See `pangu.nn.moe.parallel.balance_token_groups`.
    router_z_loss_coef: coefficient of the router z-loss mean(logsumexp(logits)^2) (ST-MoE).
    dispatch: `dropless` sorts tokens by expert and runs a grouped matmul; `capacity` gives each expert
      (or, under expert parallelism, each device) ceil(capacity_factor * assignments / buckets) slots and drops
      the rest, reporting exactly how many.
    capacity_factor: slots per bucket relative to a perfectly balanced load.
    hierarchical_dispatch: under expert parallelism over several mesh axes, all-gather tokens over the outermost
      (inter-node) axis and all-to-all over the inner ones (Pangu Ultra MoE); see
      `pangu.nn.moe.parallel.use_hierarchical_dispatch` to decide it from the topology.
    experts_implementation: grouped matmul of the dropless path: `ragged` (jax.lax.ragged_dot), `blocked`
      (groups padded to row blocks, a scan of dense matmuls), `dense` (every expert on every token, the readable
      reference), `selected` (a loop over the chosen experts; few rows, inference only) or `auto` (ragged on
      GPU/TPU, blocked on CPU, where ragged_dot computes every group densely).
    expert_storage: `device`, or `host`: the routed expert kernels live in pinned host memory and each call
      copies in the distinct experts its tokens selected (inference offloading; see pangu.nn.moe.offload).
    routing_implementation: how the `moge` router runs: `xla` (`routing.moge_route`), `pallas` (the fused
      kernel of pangu_kernels.moe_routing; interpreted on CPU, slow, for tests) or `auto` (the kernel where
      `pangu_kernels.moe_routing.pallas_supported`, else xla). Other routers have only the xla form.
  """

  num_experts: int
  top_k: int
  expert_dim: int
  router: Router = "moge"
  num_groups: int = 1
  topk_groups: int | None = None
  num_shared_experts: int = 0
  router_scale: bool = False
  routed_scaling_factor: float = 1.0
  aux_loss_coef: float = 1e-2
  aux_scores: AuxScores = "global"
  balance_scope: BalanceScope = "global_batch"
  router_z_loss_coef: float = 0.0
  dispatch: Dispatch = "dropless"
  capacity_factor: float = 1.25
  hierarchical_dispatch: bool = False
  experts_implementation: ExpertsImplementation = "auto"
  expert_storage: ExpertStorage = "device"
  routing_implementation: RoutingImplementation = "auto"

  def __post_init__(self):
    positive_ints(self, "num_experts", "top_k", "expert_dim", "num_groups")
    for name, allowed in (("router", ROUTERS), ("dispatch", DISPATCHES), ("aux_scores", AUX_SCORES),
                          ("balance_scope", BALANCE_SCOPES),
                          ("experts_implementation", EXPERTS_IMPLEMENTATIONS),
                          ("expert_storage", EXPERT_STORAGES), ("routing_implementation", ROUTING_IMPLEMENTATIONS)):
      one_of(self, name, allowed)
    if self.num_experts % self.num_groups:
      raise ValueError(f"MoEConfig.num_experts={self.num_experts} is not divisible by "
                       f"num_groups={self.num_groups}")
    if self.router == "moge":
      if self.top_k % self.num_groups:
        raise ValueError(f"MoEConfig.top_k={self.top_k} is not divisible by num_groups={self.num_groups}: MoGE "
                         "selects the same number K' of experts in every group")
      if self.k_per_group > self.group_size:
        raise ValueError(f"MoEConfig.top_k={self.top_k} asks for K'={self.k_per_group} experts per group, more "
                         f"than the group size {self.group_size}")
    if self.routing_implementation == "pallas" and self.router != "moge":
      raise ValueError(f"MoEConfig.routing_implementation='pallas' is the fused MoGE routing kernel; router="
                       f"{self.router!r} has only the 'xla' form")
    if self.top_k > self.num_experts:
      raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
    if self.router == "group_limited":
      if self.topk_groups is None or not 1 <= self.topk_groups <= self.num_groups:
        raise ValueError(f"MoEConfig.topk_groups must be in [1, num_groups={self.num_groups}] for group_limited "
                         f"routing, got {self.topk_groups!r}")
      if self.top_k > self.topk_groups * self.group_size:
        raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds the {self.topk_groups * self.group_size} experts "
                         f"of topk_groups={self.topk_groups} groups")
    elif self.topk_groups is not None:
      raise ValueError(f"MoEConfig.topk_groups is only used by group_limited routing, got {self.topk_groups!r} "
                       f"with router={self.router!r}")
    if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
      raise ValueError(f"MoEConfig.num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}")
    if not self.routed_scaling_factor > 0:
      raise ValueError(f"MoEConfig.routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}")
    for name in ("aux_loss_coef", "router_z_loss_coef"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)!r}")
    if not self.capacity_factor > 0:
      raise ValueError(f"MoEConfig.capacity_factor must be > 0, got {self.capacity_factor!r}")

  @property
  def group_size(self) -> int:
    """G = N / M."""
    return self.num_experts // self.num_groups

  @property
  def k_per_group(self) -> int:
    """K' = K / M (meaningful for MoGE)."""
    return self.top_k // self.num_groups

  @property
  def shared_dim(self) -> int:
    """Width of the one SwiGLU that stands for all shared experts (0: none)."""
    return self.num_shared_experts * self.expert_dim

  def replace(self, **changes) -> "MoEConfig":
    return dataclasses.replace(self, **changes)
