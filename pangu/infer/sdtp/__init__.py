"""SDTP: saliency-driven dynamic token pruning (arXiv 2504.04514), spec shared/specs/sdtp.md.

`schedule` (where and how much to prune, which tokens are always kept), `predictor` (the per-stage MLPs),
`training` (gradient saliency, the masked forward and the losses that train the predictors on a frozen LM),
`inference` (the pruning hook for `prefill` / `forward_in_stages`, baselines, FLOP counter).
"""

from pangu.infer.sdtp.inference import (SCORERS, PruneHook, attention_scorer_params, last_token_attention,
                                        prefill_flops, prefill_with_eviction, pruning_stages,
                                        tokens_per_layer)
from pangu.infer.sdtp.predictor import TokenPredictor, init_predictors, keep_scores, predictor_logits
from pangu.infer.sdtp.schedule import SDTPConfig, forced_mask, select_tokens
from pangu.infer.sdtp.training import (predictor_loss, predictor_train_model, predictor_training, ranking_loss,
                                       reduce_saliency, saliency, sdtp_loss)

__all__ = [
    "SCORERS", "PruneHook", "SDTPConfig", "TokenPredictor", "attention_scorer_params", "forced_mask",
    "init_predictors", "keep_scores", "last_token_attention", "predictor_logits",
    "predictor_loss", "predictor_train_model", "predictor_training", "prefill_flops", "prefill_with_eviction",
    "pruning_stages", "ranking_loss", "reduce_saliency", "saliency", "sdtp_loss",
    "select_tokens", "tokens_per_layer",
]
