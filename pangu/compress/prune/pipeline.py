"""The pruning entry point: `prune(config, params, calibration_tokens, method=..., ratio=...)`.

SlimLLM's procedure (spec 3.1-3.2), shared by every method so that only the importance criterion differs:
  1. Per-layer ratios: the cosine similarity of each layer's input and output on the calibration tokens, through
     the unpruned model, sets how much each layer loses (pangu.compress.prune.ratios); `uniform` skips this.
  2. Layers in order, each on the activations of the already pruned layers before it (calibration.py):
     score the attention units (heads or KV groups) and remove the least important, refit the output projection
     `o` (recovery.py), then, on the residual after the recovered attention, score and remove FFN channels and
     refit `down`; the pruned layer's outputs feed the next layer.
`layer_drop` instead removes whole layers (baselines.layers_to_drop).

The result is a smaller model, not a masked one: tensors lose their pruned slices and the config gets per-layer
`LayerShape`s (and output biases where the recovery adds them), so it runs, saves (pangu.interop.hf) and loads
like any other.
"""

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pangu.compress.prune import baselines, calibration, ratios, recovery, slimllm, surgery
from pangu.compress.prune.options import PruneOptions
from pangu.compress.prune.stats import Comoment
from pangu.models.config import TransformerConfig
from pangu.models.counting import param_count


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """What one layer kept, as indices into its heads / KV heads / channels before pruning.

  Attributes:
    source: the layer's index in the unpruned model (differs after layer_drop).
    ratio: the fraction of its heads and channels the layer was asked to lose.
  """

  source: int
  ratio: float
  kept_heads: tuple[int, ...]
  kept_kv_heads: tuple[int, ...]
  kept_channels: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PruneReport:
  """Outcome of one `prune` call; `layers` lists the layers that remain, in order."""

  options: PruneOptions
  layers: tuple[LayerReport, ...]
  dropped_layers: tuple[int, ...]
  params_before: int
  params_after: int
  non_embedding_before: int
  non_embedding_after: int
  calibration_tokens: int
  seconds: float

  @property
  def achieved_ratio(self) -> float:
    """The fraction of non-embedding parameters actually removed (the request rounded to whole units, plus any
    recovery biases)."""
    return 1 - self.non_embedding_after / self.non_embedding_before

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "achieved_ratio": self.achieved_ratio}


def _check_model(config: TransformerConfig, options: PruneOptions) -> None:
  if config.moe is not None:
    raise ValueError("prune covers dense decoders; config.moe is set (MoE experts are not pruned here)")
  if config.mole is not None:
    raise ValueError("prune covers dense decoders; config.mole is set (lookup experts are not pruned here)")
  if options.method == "layer_drop" or options.ratio == 0:
    return
  for i in range(config.n_layers):
    shape = config.layer(i)
    if options.gqa == "groups" and shape.n_kv_heads == 1:
      raise ValueError(f"gqa='groups' cannot remove heads from layer {i}: its {shape.n_heads} query heads share one "
                       "KV head, the only group; use gqa='heads_per_group'")
    if options.gqa == "heads_per_group" and shape.n_heads == shape.n_kv_heads:
      raise ValueError(f"gqa='heads_per_group' cannot remove heads from layer {i}: each of its {shape.n_kv_heads} "
                       "KV groups has one query head; use gqa='groups'")


def _check_tokens(tokens, config: TransformerConfig) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.shape[0] < 1 or tokens.shape[1] < 2:
    raise ValueError(f"calibration_tokens must be int [N, S] with N >= 1 and S >= 2, got {tokens.dtype} "
                     f"{tokens.shape}")
  if tokens.min() < 0 or tokens.max() >= config.vocab_size:
    raise ValueError(f"calibration_tokens must lie in [0, vocab_size={config.vocab_size}), got "
                     f"[{tokens.min()}, {tokens.max()}]")
  return tokens.astype(np.int32)


@jax.jit
def _head_shares(heads: jax.Array, o: jax.Array) -> jax.Array:
  """[n, H, Dh] heads and the o kernel [H, Dh, D] -> each head's share of the output, [n, H, D]."""
  return jnp.einsum("nhc,hcd->nhd", heads.astype(jnp.float32), o.astype(jnp.float32))


@jax.jit
def _project(inputs: jax.Array, kernel: jax.Array) -> jax.Array:
  return inputs.astype(jnp.float32) @ kernel.astype(jnp.float32)


@jax.jit
def _outputs(inputs: jax.Array, kernel: jax.Array, kept: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Input channels [n, P] of an output projection kernel [P, D] -> (kept channels z [n, P'], the pruned output
  x = z W[kept] and the unpruned output y = inputs W), all without bias."""
  z = inputs[:, kept].astype(jnp.float32)
  return z, _project(z, kernel[kept]), _project(inputs, kernel)


def _flat(activations: calibration.LayerActivations, sublayer: str) -> jax.Array:
  """The input channels of the sublayer's output projection, [n, P]."""
  if sublayer == "attn":
    return activations.heads.reshape(activations.heads.shape[0], -1)
  return activations.hidden


def _sum_of_squares(moments: Comoment) -> np.ndarray:
  return moments.count * moments.second_moment


def _head_importance(options: PruneOptions, config: TransformerConfig, params: dict, layer: int,
                     inputs: list[jax.Array], units: surgery.HeadUnits,
                     grads: dict | None) -> tuple[np.ndarray, np.ndarray | None]:
  """([U] importance, higher = keep; SlimLLM's unit covariances for the greedy search, else None)."""
  attn = params[f"layer_{layer}"]["attn"]
  if options.method == "magnitude":
    return baselines.magnitude_heads(attn, units), None
  if options.method == "taylor":
    return baselines.taylor_heads(attn, grads[f"layer_{layer}"]["attn"], units), None
  shape = config.layer(layer)
  if options.method == "slimllm":
    shares = Comoment("nhd,ngd->hgd")
    for act in calibration.capture_layer(config, params, layer, inputs):
      shares.add(_head_shares(act.heads, attn["o"]))
    cov = slimllm.unit_output_covariance(shares, units.membership, options.head_corr)
    return -slimllm.head_similarity(cov), cov
  channels = Comoment("nc,nc->c")
  for act in calibration.capture_layer(config, params, layer, inputs):
    channels.add(_flat(act, "attn"))
  if options.method == "wanda_sp":
    return baselines.wanda_heads(attn, _sum_of_squares(channels).reshape(shape.n_heads, -1), units), None
  return baselines.flap_heads(attn, channels.covariance.reshape(shape.n_heads, -1), units), None


def _channel_importance(options: PruneOptions, config: TransformerConfig, params: dict, layer: int,
                        inputs: list[jax.Array], grads: dict | None) -> np.ndarray:
  """[F] importance of the FFN channels, higher = keep."""
  mlp = params[f"layer_{layer}"]["mlp"]
  if options.method == "magnitude":
    return baselines.magnitude_channels(mlp)
  if options.method == "taylor":
    return baselines.taylor_channels(mlp, grads[f"layer_{layer}"]["mlp"])
  feature_space = options.method == "slimllm" and options.ffn_importance == "feature_space"
  hidden, ffn_input, output = Comoment("nc,nc->c"), Comoment("nc,nc->c"), Comoment("ni,nj->ij")
  for act in calibration.capture_layer(config, params, layer, inputs):
    hidden.add(act.hidden)
    if options.method == "slimllm":
      ffn_input.add(act.ffn_input)
    if feature_space:
      output.add(_project(act.hidden, mlp["down"]))
  if options.method == "slimllm":
    return slimllm.ffn_scores(mlp, output.covariance if feature_space else None, _sum_of_squares(hidden),
                              _sum_of_squares(ffn_input), options.ffn_importance)
  if options.method == "wanda_sp":
    return baselines.wanda_channels(mlp, _sum_of_squares(hidden))
  return baselines.flap_channels(mlp, hidden.covariance)


def _lowest(importance: np.ndarray, blocks: tuple[int, ...], counts: dict[int, int]) -> list[int]:
  """The `counts[b]` least important units of every block b, least important first."""
  order = np.argsort(importance, kind="stable")
  removed = []
  for block, count in counts.items():
    removed += [int(u) for u in order if blocks[u] == block][:count]
  return sorted(removed, key=lambda u: (importance[u], u))


def _cut(options: PruneOptions, config: TransformerConfig, params: dict, layer: int, inputs: list[jax.Array],
         sublayer: str, kept: np.ndarray) -> tuple[TransformerConfig, dict]:
  """Removes all but `kept` heads (attn) or channels (mlp) and refits the output projection (spec 3.6), fitting
  on the layer as it is before the cut."""
  kernel_name, bias_name = ("o", "o_bias") if sublayer == "attn" else ("down", "down_bias")
  kernel = params[f"layer_{layer}"][sublayer][kernel_name]
  cut = surgery.keep_heads if sublayer == "attn" else surgery.keep_channels
  new_config, new_params = cut(config, params, layer, kept)
  method, intercept = options.recovery_method, options.intercept(sublayer)
  if method == "none":
    return new_config, new_params
  d_model = kernel.shape[-1]
  flat_kernel = kernel.reshape(-1, d_model)
  per_unit = flat_kernel.shape[0] // kernel.shape[0]
  kept_rows = (kept[:, None] * per_unit + np.arange(per_unit)).ravel()
  index = jnp.asarray(kept_rows)
  if method == "lstsq":
    first, second = Comoment("ni,nj->ij"), Comoment("ni,nd->id")
  else:
    first, second = Comoment("nd,nd->d"), Comoment("nd,nd->d")
  for act in calibration.capture_layer(config, params, layer, inputs):
    z, x, y = _outputs(_flat(act, sublayer), flat_kernel, index)
    if method == "lstsq":
      first.add(z)
      second.add(z, y)
    else:
      first.add(x, y)
      second.add(x)
  if method == "lstsq":
    new_kernel, shift = recovery.least_squares(first, second, intercept, options.ridge)
  else:
    scale, shift = recovery.channel_fit(recovery.ChannelMoments.from_pairs(first, second), method,
                                        intercept)
    new_kernel = np.asarray(flat_kernel, np.float64)[kept_rows] * scale
  if intercept:
    new_config, new_params = surgery.enable_output_biases(new_config, new_params, attention=sublayer == "attn",
                                                          mlp=sublayer == "mlp")
  sub = dict(new_params[f"layer_{layer}"][sublayer])
  sub[kernel_name] = jnp.asarray(new_kernel.reshape(sub[kernel_name].shape), kernel.dtype)
  if intercept:
    sub[bias_name] = jnp.asarray(np.asarray(sub[bias_name], np.float64) + shift, sub[bias_name].dtype)
  return new_config, {**new_params, f"layer_{layer}": {**new_params[f"layer_{layer}"], sublayer: sub}}


def _prune_layer(options: PruneOptions, config: TransformerConfig, params: dict, layer: int,
                 inputs: list[jax.Array], ratio: float,
                 grads: dict | None) -> tuple[TransformerConfig, dict, LayerReport]:
  """Spec 3.2 for one layer: heads first (scored, greedy-refined for SlimLLM, cut, `o` refit), then the FFN
  channels scored on the residual after the recovered attention (cut, `down` refit)."""
  shape = config.layer(layer)
  units = surgery.head_units(shape, options.gqa)
  counts = ratios.units_removed(units, ratio)
  kept_heads = np.arange(shape.n_heads)
  if any(counts.values()):
    importance, cov = _head_importance(options, config, params, layer, inputs, units, grads)
    removed = _lowest(importance, units.blocks, counts)
    kept_units = [u for u in range(len(units.members)) if u not in removed]
    if options.method == "slimllm" and options.greedy_search:
      kept_units = slimllm.greedy_refine(cov, kept_units, removed, units.blocks)
    kept_heads = np.sort(np.concatenate([units.members[u] for u in kept_units]))
    config, params = _cut(options, config, params, layer, inputs, "attn", kept_heads)
  group = shape.n_heads // shape.n_kv_heads
  kept_kv = np.unique(kept_heads // group) if units.removes_kv else np.arange(shape.n_kv_heads)
  n_channels = ratios.channels_removed(shape.d_ff, ratio, options.ffn_exempt_lowest_frac)
  kept_channels = np.arange(shape.d_ff)
  if n_channels:
    order = np.argsort(_channel_importance(options, config, params, layer, inputs, grads), kind="stable")
    exempt = round(options.ffn_exempt_lowest_frac * shape.d_ff)
    kept_channels = np.setdiff1d(kept_channels, order[exempt:exempt + n_channels])
    config, params = _cut(options, config, params, layer, inputs, "mlp", kept_channels)
  report = LayerReport(layer, float(ratio), tuple(kept_heads.tolist()), tuple(kept_kv.tolist()),
                       tuple(kept_channels.tolist()))
  return config, params, report


def prune(config: TransformerConfig, params: dict, calibration_tokens: np.ndarray, *, method: str, ratio: float,
          uniform: bool = False, **method_options) -> tuple[TransformerConfig, dict, PruneReport]:
  """Structured pruning of a dense decoder: (config, params) -> (smaller config, its params, report).

  Args:
    config, params: the model, in any layout (scanned or unrolled, training or decode kernels); the result comes
      back in the same layout (unrolled when the layers end up with different shapes).
    calibration_tokens: int [N, S] whole sequences (SlimLLM: 32 x 128 from a corpus other than the evaluation's).
    method: `slimllm`, `magnitude`, `wanda_sp`, `flap`, `taylor` or `layer_drop` (see pangu.compress.prune).
    ratio: fraction of the non-embedding parameters to remove, in [0, 1); met as nearly as whole heads, KV
      groups, channels or layers allow (report.achieved_ratio says what was met).
    uniform: the same ratio in every layer instead of SlimLLM's similarity-driven per-layer ratios.
    **method_options: the fields of `PruneOptions` the method reads (options.METHOD_OPTIONS).

  Raises ValueError naming the problem for an unknown method or option, a ratio outside [0, 1) or out of reach,
  a GQA request the model's groups cannot satisfy, MoE / MoLE models and malformed calibration tokens.
  """
  options = PruneOptions.create(method, ratio, uniform, method_options)
  _check_model(config, options)
  tokens = _check_tokens(calibration_tokens, config)
  start = time.perf_counter()
  work_config, work = surgery.unrolled(config, params)
  n_layers = work_config.n_layers
  inputs = calibration.embed(work_config, work, tokens, options.batch_size)
  similarities = None
  if method == "layer_drop" or not uniform:
    similarities = calibration.layer_similarities(work_config, work, inputs)
  if method == "layer_drop":
    dropped = baselines.layers_to_drop(work_config, similarities, options.ratio)
    kept_layers = [i for i in range(n_layers) if i not in dropped]
    layers = tuple(LayerReport(i, 0.0, tuple(range(s.n_heads)), tuple(range(s.n_kv_heads)), tuple(range(s.d_ff)))
                   for i, s in ((i, work_config.layer(i)) for i in kept_layers))
    work_config, work = surgery.drop_layers(work_config, work, dropped)
  else:
    dropped = []
    weights = np.ones(n_layers) if uniform else ratios.layer_weights(similarities, *options.layer_settings(n_layers))
    layer_ratios = ratios.solve_layer_ratios(work_config, weights, options)
    grads = None
    if method == "taylor" and layer_ratios.any():
      grads = baselines.lm_loss_gradients(work_config, work, tokens, options.batch_size)
    reports = []
    for layer in range(n_layers):
      work_config, work, report = _prune_layer(options, work_config, work, layer, inputs, layer_ratios[layer], grads)
      reports.append(report)
      if layer_ratios[layer + 1:].any():
        inputs = calibration.run_layer(work_config, work, layer, inputs)
    layers = tuple(reports)
  new_config, new_params = surgery.finalise(work_config, work, like=config)
  jax.block_until_ready(new_params)
  report = PruneReport(
      options=options, layers=layers, dropped_layers=tuple(dropped), params_before=param_count(config),
      params_after=param_count(new_config), non_embedding_before=ratios.non_embedding_params(config),
      non_embedding_after=ratios.non_embedding_params(new_config), calibration_tokens=int(tokens.size),
      seconds=time.perf_counter() - start)
  return new_config, new_params, report
