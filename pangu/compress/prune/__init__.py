"""Structured pruning that really shrinks a decoder: SlimLLM (arXiv 2505.22689) and standard baselines.

  new_config, new_params, report = prune(config, params, calibration_tokens, method="slimllm", ratio=0.2)

Modules, one idea each: `calibration` (per-layer activations of the pruned prefix), `stats` (streamed float64
moments), `surgery` (removing heads, KV groups, channels, layers), `ratios` (per-layer ratios and parameter
accounting), `slimllm` (head correlation, greedy search, feature-space channel scores), `baselines` (magnitude,
Wanda-sp, FLAP, LLM-Pruner Taylor, layer drop), `recovery` (output refits), `pipeline` (the sequential procedure
and `prune`). Spec: shared/specs/slimllm.md.
"""

from pangu.compress.prune.options import METHODS, PruneOptions
from pangu.compress.prune.pipeline import LayerReport, PruneReport, prune

__all__ = ["METHODS", "LayerReport", "PruneOptions", "PruneReport", "prune"]
