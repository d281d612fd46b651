"""Model compression: transforms `(config, params, ...) -> (config, params, ...)` that make a trained decoder smaller.

`pangu.compress.prune`: structured pruning of attention heads, FFN channels and whole layers (SlimLLM and baselines).
"""
