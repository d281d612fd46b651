"""Pangu Light (arXiv 2505.20155): joint width, depth, head and FFN pruning with weight re-initialisation.

  new_config, new_params, report = pangu_light_prune(config, params, calibration_tokens,
                                                     target=LightTarget(n_layers=10, d_model=192, n_heads=6,
                                                                        d_ff=512))

The sibling of `prune` (same arguments, same (config, params, report) result) for a target shape instead of a
ratio, since Pangu Light cuts the residual width too, which no per-layer ratio expresses. Steps (spec 3):
  0. importances on the unpruned model, once (light_stats);
  1. post-norm absorption of a sandwich model (absorb_stage="before_kd"): each post-norm becomes the constant
     c * gamma_post folded into o / down, and the model becomes pre-norm;
  2. depth: the L - L' layers of lowest Block Influence go (never layer 0); with CLAP each donates its KV groups
     (and with clap_ffn="merge" its FFN neurons) to the nearest kept layer before it, which keeps the best G' of
     its own and its donors' (light_reinit.merge_attention); with depth_reinit="drop" they just go;
  3. heads and FFN neurons: the top G' KV groups and top F' neurons of every other layer;
  4. width: the top D' hidden channels, the same on the whole residual stream (embedding, every layer's input
     rows and output columns, every hidden-dim norm, the final norm, the LM head; a tied embedding once), each
     hidden-dim gain re-scaled by SLNP.
The result is a uniform model with an explicit head_dim (Dh unchanged), in the caller's layout, so a pre-norm
result saves to Hugging Face (pangu.interop.hf) like its source.
"""

import dataclasses
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from pangu.compress.prune import light_reinit, surgery
from pangu.compress.prune.light_stats import POST_NORMS, LightStats, collect_light_stats, random_importance
from pangu.config_checks import one_of, positive_ints
from pangu.models.config import TransformerConfig
from pangu.models.counting import param_count

DEPTH_REINITS = ("clap", "drop")
CLAP_FFN = ("drop", "merge")
ABSORB_STAGES = ("before_kd", "after_kd")
IMPORTANCES = ("activation", "random")
_OUTPUT = {"attn": ("o", "o_bias"), "mlp": ("down", "down_bias")}


@dataclasses.dataclass(frozen=True)
class LightTarget:
  """The pruned shape (L', D', H', F'); the query heads per KV group and the head dim stay as they are, so
  n_heads must be whole KV groups."""

  n_layers: int
  d_model: int
  n_heads: int
  d_ff: int

  def __post_init__(self):
    positive_ints(self, "n_layers", "d_model", "n_heads", "d_ff")

  def check(self, config: TransformerConfig) -> None:
    """A ValueError naming the field when the target does not fit inside `config` or would split a GQA group."""
    for field, have in (("n_layers", config.n_layers), ("d_model", config.d_model), ("n_heads", config.n_heads),
                        ("d_ff", config.d_ff)):
      if getattr(self, field) > have:
        raise ValueError(f"LightTarget.{field}={getattr(self, field)} exceeds the model's {have}")
    group = config.n_heads // config.n_kv_heads
    if self.n_heads % group:
      raise ValueError(f"LightTarget.n_heads={self.n_heads} would split a GQA group: the model has {group} query "
                       f"heads per KV head ({config.n_heads} / {config.n_kv_heads}), so n_heads must be a multiple "
                       f"of {group}")


@dataclasses.dataclass(frozen=True)
class LightOptions:
  """Pangu Light's flags (spec 3; every formula is a reconstruction, so each has its alternatives).

  Attributes:
    depth_reinit: `clap` (removed layers donate KV groups to their predecessor) or `drop` (plain removal).
    clap_group_norm: `raw` importances pooled as they are, or `per_layer_sum` (each layer's divided by its sum).
    clap_norm_fold: `ratio` (transferred input rows times gamma_pre_s / gamma_pre_l, output columns likewise
      with the post-norm gains while they exist) or `none`.
    clap_ffn: the donor's FFN `drop`ped, or `merge`d by neuron importance like the KV groups.
    slnp: hidden-dim gains after width pruning: `l2` (norm-preserving), `sqrt_ratio` or `none` (truncation).
    absorb: post-norm absorption: `const_lstsq`, `const_mean`, `drop` (delete the norm) or `none` (keep it).
    absorb_stage: `before_kd` (here, before CLAP) or `after_kd` (kept here; call `absorb_post_norms` later).
    importance: `activation` (the calibration statistics) or `random` (seeded noise in their place: the lower bound
      the spec's ablation compares against).
    seed: the noise seed of `random` importance.
    batch_size: calibration sequences per batch.
  """

  depth_reinit: str = "clap"
  clap_group_norm: str = "raw"
  clap_norm_fold: str = "ratio"
  clap_ffn: str = "drop"
  slnp: str = "l2"
  absorb: str = "const_lstsq"
  absorb_stage: str = "before_kd"
  importance: str = "activation"
  seed: int = 0
  batch_size: int = 8

  def __post_init__(self):
    one_of(self, "depth_reinit", DEPTH_REINITS)
    one_of(self, "clap_group_norm", light_reinit.GROUP_NORMS)
    one_of(self, "clap_norm_fold", light_reinit.NORM_FOLDS)
    one_of(self, "clap_ffn", CLAP_FFN)
    one_of(self, "slnp", light_reinit.SLNP_MODES)
    one_of(self, "absorb", light_reinit.ABSORB_METHODS)
    one_of(self, "absorb_stage", ABSORB_STAGES)
    one_of(self, "importance", IMPORTANCES)
    positive_ints(self, "batch_size")


@dataclasses.dataclass(frozen=True)
class LightReport:
  """What `pangu_light_prune` kept, in the unpruned model's indices.

  Attributes:
    kept_layers: source index of each remaining layer; donors: recipient -> the removed layers it absorbed.
    kept_channels: the D' hidden channels.
    absorb_coefficients / rms_cv: per folded post-norm "layer/attn|mlp": c and the coefficient of variation of
      RMS(z) on the calibration tokens (how far from exact the fold is; empty when nothing was folded).
  """

  options: LightOptions
  target: LightTarget
  kept_layers: tuple[int, ...]
  donors: dict[int, tuple[int, ...]]
  kept_channels: tuple[int, ...]
  block_influence: tuple[float, ...]
  absorb_coefficients: dict[str, float]
  rms_cv: dict[str, float]
  params_before: int
  params_after: int
  non_embedding_before: int
  non_embedding_after: int
  seconds: float

  @property
  def achieved_ratio(self) -> float:
    """The fraction of non-embedding parameters removed."""
    return 1 - self.non_embedding_after / self.non_embedding_before

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["donors"] = {str(k): list(v) for k, v in self.donors.items()}
    return {**out, "achieved_ratio": self.achieved_ratio}


def _non_embedding(config: TransformerConfig) -> int:
  head = 0 if config.tie_embeddings else config.vocab_size * config.d_model
  return param_count(config) - config.vocab_size * config.d_model - head


def _check_model(config: TransformerConfig) -> None:
  if config.moe is not None or config.mole is not None:
    raise ValueError("pangu_light_prune covers dense decoders; config.moe / config.mole is set")
  if not config.is_uniform:
    raise ValueError("pangu_light_prune needs a uniform model (no per-layer layer_shapes); the source is already "
                     "pruned layer by layer")


def _layer_gain(params: dict, layer: int, norm: str) -> np.ndarray | None:
  block = params[f"layer_{layer}"]
  return np.asarray(block[norm]["scale"], np.float64) if norm in block else None


def fold_post_norms(config: TransformerConfig, params: dict, absorb: dict,
                    method: str) -> tuple[TransformerConfig, dict, dict[str, float]]:
  """Spec 3.2 on an unrolled sandwich model: every post-norm folded into its output kernel (c from `absorb`,
  {(layer, sub): AbsorbStats}) and deleted; the model becomes pre-norm. Returns the coefficients too."""
  coefficients, params = {}, dict(params)
  for i in range(config.n_layers):
    block = dict(params[f"layer_{i}"])
    for sub, norm in POST_NORMS.items():
      kernel_name, bias_name = _OUTPUT[sub]
      c = absorb[(i, sub)].coefficient(method)
      part = dict(block[sub])
      gamma = np.asarray(block.pop(norm)["scale"], np.float64)
      kernel, bias = light_reinit.fold_post_norm(np.asarray(part[kernel_name], np.float64),
                                                 np.asarray(part[bias_name], np.float64) if bias_name in part
                                                 else None, gamma, c, method)
      part[kernel_name] = jnp.asarray(kernel, part[kernel_name].dtype)
      if bias is not None:
        part[bias_name] = jnp.asarray(bias, part[bias_name].dtype)
      block[sub] = part
      coefficients[f"{i}/{sub}"] = c
    params[f"layer_{i}"] = block
  return config.replace(norm_placement="pre"), params, coefficients


def absorb_post_norms(config: TransformerConfig, params: dict, calibration_tokens: np.ndarray, *,
                      absorb: str = "const_lstsq", batch_size: int = 8) -> tuple[TransformerConfig, dict, dict]:
  """`absorb_stage="after_kd"`: folds a (distilled) sandwich model's post-norms, c fitted on its own calibration
  activations. Returns (pre-norm config, params, {"coefficients", "rms_cv"})."""
  if config.norm_placement == "pre" or absorb == "none":
    raise ValueError(f"absorb_post_norms needs a sandwich model and absorb != 'none', got norm_placement="
                     f"{config.norm_placement!r}, absorb={absorb!r}")
  like = config
  config, params = surgery.unrolled(config, params)
  stats = collect_light_stats(config, params, np.asarray(calibration_tokens), batch_size)
  config, params, coefficients = fold_post_norms(config, params, stats.absorb, absorb)
  config, params = surgery.finalise(config, params, like)
  return config, params, {"coefficients": coefficients,
                          "rms_cv": {f"{i}/{s}": v.rms_cv for (i, s), v in stats.absorb.items()}}


def _depth_plan(stats: LightStats, n_layers: int, keep: int) -> tuple[list[int], dict[int, list[int]]]:
  """(kept layers, recipient -> donors): the lowest-BI layers go, never layer 0; each donates to the nearest
  kept layer before it."""
  candidates = sorted(range(1, n_layers), key=lambda i: (stats.block_influence[i], i))
  removed = set(candidates[:n_layers - keep])
  kept = [i for i in range(n_layers) if i not in removed]
  donors = {i: [] for i in kept}
  for m in sorted(removed):
    donors[max(i for i in kept if i < m)].append(m)
  return kept, donors


def _reinit_layer(options: LightOptions, config: TransformerConfig, params: dict, stats: LightStats, layer: int,
                  donors: list[int], target: LightTarget) -> dict:
  """The layer's attention and FFN re-initialised from itself and its donors (none: plain top-k)."""
  sources = [layer] + (donors if options.depth_reinit == "clap" else [])
  fold = options.clap_norm_fold == "ratio"
  def gains(norm):
    found = [_layer_gain(params, s, norm) for s in sources]
    return found if fold and found[0] is not None else None
  block = dict(params[f"layer_{layer}"])
  group = config.n_heads // config.n_kv_heads
  to_np = lambda tree: {k: np.asarray(v) for k, v in tree.items()}
  chosen = light_reinit.pooled_units([stats.groups(s, config.n_kv_heads) for s in sources],
                                     target.n_heads // group, options.clap_group_norm)
  pre = gains("pre_attn_norm") or [np.ones(config.d_model)] * len(sources)
  block["attn"] = light_reinit.merge_attention([to_np(params[f"layer_{s}"]["attn"]) for s in sources], pre,
                                               gains("post_attn_norm"), chosen, group)
  ffn_sources = sources if options.clap_ffn == "merge" else [layer]
  chosen = light_reinit.pooled_units([stats.ffn[s] for s in ffn_sources], target.d_ff, options.clap_group_norm)
  pre = gains("pre_mlp_norm") or [np.ones(config.d_model)] * len(sources)
  post = gains("post_mlp_norm")
  block["mlp"] = light_reinit.merge_mlp([to_np(params[f"layer_{s}"]["mlp"]) for s in ffn_sources],
                                        pre[:len(ffn_sources)], None if post is None else post[:len(ffn_sources)],
                                        chosen)
  return block


def _slice_width(config: TransformerConfig, params: dict, kept: np.ndarray, slnp: str) -> dict:
  """Every consumer of the residual stream cut to the hidden channels `kept`; hidden-dim gains by SLNP."""
  out = {"embedding": params["embedding"][:, kept],
         "final_norm": {"scale": light_reinit.slnp_gain(np.asarray(params["final_norm"]["scale"]), kept, slnp)}}
  if "lm_head" in params:
    out["lm_head"] = params["lm_head"][kept]
  for i in range(config.n_layers):
    block = {}
    for name, part in params[f"layer_{i}"].items():
      if name.endswith("_norm"):
        block[name] = {"scale": light_reinit.slnp_gain(np.asarray(part["scale"]), kept, slnp)}
        continue
      part = dict(part)
      for key, value in part.items():
        if key in ("q", "k", "v", "gate", "up"):
          part[key] = value[kept]
        elif key in ("o", "down"):
          part[key] = value[..., kept]
        elif key in ("o_bias", "down_bias"):
          part[key] = value[kept]
      block[name] = part
    out[f"layer_{i}"] = block
  return {k: _as_jax(v) for k, v in out.items()}


def _as_jax(tree):
  if isinstance(tree, dict):
    return {k: _as_jax(v) for k, v in tree.items()}
  return jnp.asarray(tree)


def pangu_light_prune(config: TransformerConfig, params: dict, calibration_tokens: np.ndarray, *,
                      target: LightTarget, options: LightOptions = LightOptions()
                      ) -> tuple[TransformerConfig, dict, LightReport]:
  """Pangu Light's joint pruning of a dense decoder to `target` (steps in the module docstring).

  Args:
    config, params: the model in any layout; the result comes back in the same layout.
    calibration_tokens: int [N, S] whole sequences (spec: 32 x 128).
    target: the pruned shape; options: the flags.

  Raises ValueError naming the problem for a non-uniform, MoE or MoLE model, bad calibration tokens, or a target
  that does not fit (larger than the model, no layer left, a split GQA group).
  """
  start = time.perf_counter()
  _check_model(config)
  target.check(config)
  tokens = np.asarray(calibration_tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0 or \
      tokens.max() >= config.vocab_size:
    raise ValueError(f"calibration_tokens must be int [N, S] in [0, vocab_size={config.vocab_size}), got "
                     f"{tokens.dtype} {tokens.shape}")
  like = config
  work_config, work = surgery.unrolled(config, params)
  stats = collect_light_stats(work_config, work, tokens.astype(np.int32), options.batch_size)
  if options.importance == "random":
    stats = random_importance(stats, options.seed)
  coefficients, rms_cv = {}, {}
  if work_config.norm_placement != "pre" and options.absorb != "none" and options.absorb_stage == "before_kd":
    work_config, work, coefficients = fold_post_norms(work_config, work, stats.absorb, options.absorb)
    rms_cv = {f"{i}/{s}": v.rms_cv for (i, s), v in stats.absorb.items()}
  kept_layers, donors = _depth_plan(stats, config.n_layers, target.n_layers)
  layers = {f"layer_{j}": _reinit_layer(options, work_config, work, stats, i, donors[i], target)
            for j, i in enumerate(kept_layers)}
  kept_channels = np.sort(np.argsort(-stats.hidden, kind="stable")[:target.d_model])
  rest = {k: v for k, v in work.items() if not k.startswith("layer_")}
  new_config = work_config.replace(
      n_layers=target.n_layers, d_model=target.d_model, head_dim=config.head_dim, n_heads=target.n_heads,
      n_kv_heads=target.n_heads // (config.n_heads // config.n_kv_heads), d_ff=target.d_ff, layer_shapes=None)
  new_params = _slice_width(new_config, {**rest, **layers}, kept_channels, options.slnp)
  new_config, new_params = surgery.finalise(
      new_config.replace(layer_shapes=(new_config.layer(0),) * target.n_layers), new_params, like)
  report = LightReport(
      options=options, target=target, kept_layers=tuple(kept_layers),
      donors={i: tuple(d) for i, d in donors.items() if d and options.depth_reinit == "clap"},
      kept_channels=tuple(int(k) for k in kept_channels),
      block_influence=tuple(float(b) for b in stats.block_influence), absorb_coefficients=coefficients,
      rms_cv=rms_cv, params_before=param_count(config), params_after=param_count(new_config),
      non_embedding_before=_non_embedding(config), non_embedding_after=_non_embedding(new_config),
      seconds=time.perf_counter() - start)
  return new_config, new_params, report
