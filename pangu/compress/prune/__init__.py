"""Structured pruning that really shrinks a decoder: SlimLLM (arXiv 2505.22689) and standard baselines.

  new_config, new_params, report = prune(config, params, calibration_tokens, method="slimllm", ratio=0.2)

Modules, one idea each: `calibration` (per-layer activations of the pruned prefix), `stats` (streamed float64
moments), `surgery` (removing heads, KV groups, channels, layers), `ratios` (per-layer ratios and parameter
accounting), `slimllm` (head correlation, greedy search, feature-space channel scores), `baselines` (magnitude,
Wanda-sp, FLAP, LLM-Pruner Taylor, layer drop), `recovery` (output refits), `pipeline` (the sequential procedure
and `prune`). Spec: shared/specs/slimllm.md.

Pangu Light (arXiv 2505.20155, spec shared/specs/pangu_light.md) is `prune`'s sibling for a target shape, since it
also cuts the residual width:

  new_config, new_params, report = pangu_light_prune(config, params, calibration_tokens, target=LightTarget(...))

with `light_stats` (its importances, from one pass of the unpruned model), `light_reinit` (post-norm absorption,
CLAP, SLNP as array math) and `pangu_light` (the procedure; `absorb_post_norms` for absorption after KD).
"""

from pangu.compress.prune.options import METHODS, PruneOptions
from pangu.compress.prune.pangu_light import (LightOptions, LightReport, LightTarget, absorb_post_norms,
                                              pangu_light_prune)
from pangu.compress.prune.pipeline import LayerReport, PruneReport, prune

__all__ = ["METHODS", "LayerReport", "LightOptions", "LightReport", "LightTarget", "PruneOptions", "PruneReport",
           "absorb_post_norms", "pangu_light_prune", "prune"]
