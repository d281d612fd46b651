"""What a pruning call asks for: the method, the ratio and the method's options, checked before any work starts.

Defaults follow the SlimLLM paper where it is explicit and the authors' code (guojialong1/Slimllm) where the paper
is silent; spec: shared/specs/slimllm.md section 3.
"""

import dataclasses
from typing import Any

from pangu.config_checks import one_of, positive_ints

METHODS = ("slimllm", "magnitude", "wanda_sp", "flap", "taylor", "layer_drop")
GQA_MODES = ("groups", "heads_per_group")
HEAD_CORRELATIONS = ("per_channel", "flattened")
FFN_IMPORTANCES = ("feature_space", "plain")
RECOVERIES = ("none", "mean_shift", "channel_affine", "lstsq")
# Each method's own output recovery: SlimLLM's linear regression (spec 3.6), FLAP's bias compensation (the removed
# channels' mean contribution, i.e. the affine fit with the scale fixed at 1); magnitude, Wanda-sp and LLM-Pruner
# publish none.
DEFAULT_RECOVERY = {"slimllm": "channel_affine", "magnitude": "none", "wanda_sp": "none", "flap": "mean_shift",
                    "taylor": "none", "layer_drop": "none"}

_LAYERWISE = frozenset({"gqa", "recovery", "recovery_bias", "mlp_recovery_bias", "ridge", "layer_alpha",
                        "selected_layers", "max_layer_ratio", "batch_size"})
# The options each method reads; passing another is an error rather than silently ignored.
METHOD_OPTIONS = {
    "slimllm": _LAYERWISE | {"head_corr", "greedy_search", "ffn_importance", "ffn_exempt_lowest_frac"},
    "magnitude": _LAYERWISE, "wanda_sp": _LAYERWISE, "flap": _LAYERWISE, "taylor": _LAYERWISE,
    "layer_drop": frozenset({"batch_size"}),
}
# Spec 3.1, the official scripts for 32-layer LLaMA-7B: 20 % target -> alpha 10, 26 of 32 layers pruned;
# 50 % -> alpha 7, 30 of 32. Ratios below this threshold take the first setting, the rest the second.
SMALL_RATIO_SETTINGS, LARGE_RATIO_SETTINGS, SETTINGS_THRESHOLD = (10.0, 26 / 32), (7.0, 30 / 32), 0.35


@dataclasses.dataclass(frozen=True)
class PruneOptions:
  """One pruning request.

  Attributes:
    method: one of METHODS.
    ratio: fraction of the non-embedding parameters to remove, in [0, 1).
    uniform: the same ratio in every layer; False: SlimLLM's per-layer ratios from the cosine similarity of each
      layer's input and output (spec 3.1) for every method, so that only the importance criterion differs.
    gqa: `groups` removes whole KV groups (their K/V heads and query heads); `heads_per_group` removes the same
      number of query heads from every group and keeps all K/V heads.
    recovery: output recovery of `o` / `down` (None: the method's own, DEFAULT_RECOVERY): `none`; `mean_shift`
      (FLAP's bias compensation); `channel_affine` (SlimLLM's per-output-channel y ~ A x + B); `lstsq` (a full
      least-squares refit of the kept kernel, with `ridge`).
    recovery_bias: the fit has an intercept, which adds a bias to `o` / `down` (False: scale / kernel only).
    mlp_recovery_bias: with recovery_bias, the FFN's fit has one too (False: `o` gets a bias, `down` none, as a
      Qwen3 checkpoint needs: transformers' Qwen3 has o_proj biases but no MLP biases, pangu.interop.hf).
    ridge: lstsq's Tikhonov term, relative to the mean diagonal of the input covariance.
    layer_alpha: softmax temperature of the per-layer ratios (None: 10 below a 35 % ratio, 7 from it).
    selected_layers: how many layers are pruned, the most input/output-similar ones (None: round(L * 26/32)
      below a 35 % ratio, round(L * 30/32) from it).
    max_layer_ratio: per-layer ratio cap (the official code does not clip; the spec does, at 0.9).
    batch_size: calibration sequences per streamed batch.
    head_corr: SlimLLM head similarity `per_channel` (sum over output channels of |Pearson|, the code) or
      `flattened` (one Pearson over every entry).
    greedy_search: SlimLLM's swap refinement of the kept heads (paper Algorithm 1).
    ffn_importance: SlimLLM channel score with the PCA eigen-weighting (`feature_space`) or without (`plain`).
    ffn_exempt_lowest_frac: the official code keeps the lowest-scoring 1 % of channels (0.01 reproduces it);
      the paper does not mention it (default 0).
  """

  method: str
  ratio: float
  uniform: bool = False
  gqa: str = "groups"
  recovery: str | None = None
  recovery_bias: bool = True
  mlp_recovery_bias: bool = True
  ridge: float = 1e-4
  layer_alpha: float | None = None
  selected_layers: int | None = None
  max_layer_ratio: float = 0.9
  batch_size: int = 8
  head_corr: str = "per_channel"
  greedy_search: bool = True
  ffn_importance: str = "feature_space"
  ffn_exempt_lowest_frac: float = 0.0

  def __post_init__(self):
    one_of(self, "method", METHODS)
    if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
      raise ValueError(f"PruneOptions.ratio is the fraction of non-embedding parameters to remove and must be in "
                       f"[0, 1), got {self.ratio!r}")
    one_of(self, "gqa", GQA_MODES)
    if self.recovery is not None:
      one_of(self, "recovery", RECOVERIES)
    one_of(self, "head_corr", HEAD_CORRELATIONS)
    one_of(self, "ffn_importance", FFN_IMPORTANCES)
    positive_ints(self, "batch_size")
    if self.selected_layers is not None:
      positive_ints(self, "selected_layers")
    if self.layer_alpha is not None and not self.layer_alpha >= 0:
      raise ValueError(f"PruneOptions.layer_alpha must be >= 0 or None, got {self.layer_alpha!r}")
    if not 0 < self.max_layer_ratio < 1:
      raise ValueError(f"PruneOptions.max_layer_ratio must be in (0, 1), got {self.max_layer_ratio!r}")
    if not 0 <= self.ffn_exempt_lowest_frac < 1:
      raise ValueError(f"PruneOptions.ffn_exempt_lowest_frac must be in [0, 1), got {self.ffn_exempt_lowest_frac!r}")
    if not self.ridge >= 0:
      raise ValueError(f"PruneOptions.ridge must be >= 0, got {self.ridge!r}")
    if self.recovery_method == "mean_shift" and not (self.recovery_bias and self.mlp_recovery_bias):
      flag = "mlp_recovery_bias" if self.recovery_bias else "recovery_bias"
      raise ValueError(f"PruneOptions.recovery='mean_shift' is a bias correction; {flag}=False leaves nothing")
    if self.method == "layer_drop" and self.uniform:
      raise ValueError("PruneOptions.uniform=True does not apply to method 'layer_drop', which removes whole layers")

  @classmethod
  def create(cls, method: str, ratio: float, uniform: bool, method_options: dict[str, Any]) -> "PruneOptions":
    """The options of `method`, refusing any option the method does not read (naming it and the valid ones)."""
    if method not in METHOD_OPTIONS:
      raise ValueError(f"PruneOptions.method must be one of {METHODS}, got {method!r}")
    unknown = sorted(set(method_options) - METHOD_OPTIONS[method])
    if unknown:
      raise ValueError(f"method {method!r} takes no option {unknown}; its options are {sorted(METHOD_OPTIONS[method])}")
    return cls(method=method, ratio=ratio, uniform=uniform, **method_options)

  @property
  def recovery_method(self) -> str:
    return DEFAULT_RECOVERY[self.method] if self.recovery is None else self.recovery

  def intercept(self, sublayer: str) -> bool:
    """Whether the refit of `sublayer`'s ("attn" or "mlp") output projection has an intercept."""
    return self.recovery_bias and (sublayer == "attn" or self.mlp_recovery_bias)

  def adds_bias(self, sublayer: str) -> bool:
    """Whether recovery writes a bias into `sublayer`'s pruned output projection."""
    return self.recovery_method != "none" and self.intercept(sublayer)

  def layer_settings(self, n_layers: int) -> tuple[float, int]:
    """(alpha, number of pruned layers) of the per-layer ratios (spec 3.1), scaled to n_layers."""
    alpha, fraction = SMALL_RATIO_SETTINGS if self.ratio < SETTINGS_THRESHOLD else LARGE_RATIO_SETTINGS
    alpha = alpha if self.layer_alpha is None else self.layer_alpha
    selected = max(1, round(n_layers * fraction)) if self.selected_layers is None else self.selected_layers
    if selected > n_layers:
      raise ValueError(f"PruneOptions.selected_layers={selected} exceeds the model's {n_layers} layers")
    return alpha, selected
