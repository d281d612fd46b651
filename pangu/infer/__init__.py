"""Generation: a KV cache, samplers and batched prefill + decode (`python -m pangu.infer.generate` runs it)."""

from pangu.infer.decoding import (DecodeState, GenerationConfig, decode, decode_layout, decode_step, generate,
                                  left_pad, prefill, prompt_bucket)
from pangu.infer.kv_cache import (DenseLayerCache, KVCache, LatentLayerCache, cache_bytes, extend, extend_cache,
                                  init_cache)
from pangu.infer.sampling import SamplingConfig, filter_logits, sample

__all__ = [
    "DecodeState", "DenseLayerCache", "GenerationConfig", "KVCache", "LatentLayerCache", "SamplingConfig", "cache_bytes", "decode",
    "decode_layout", "decode_step", "extend", "extend_cache", "filter_logits", "generate", "init_cache", "left_pad",
    "prefill", "prompt_bucket", "sample",
]
