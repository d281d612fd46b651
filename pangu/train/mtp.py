"""The multi-token-prediction loss (Pangu Ultra MoE; DeepSeek-V3 sec. 2.2) as an injected `LossFn`.

L = L_main + mtp_weight * L_mtp, where L_main is `lm_loss`'s next-token cross entropy (with its z-loss and, for
MoE, balance losses) and L_mtp the cross entropy of the MTP block predicting token s+2 from position s: it
reads the main model's last hidden state at s and the embedding of token s+1 (the target of s), so the
targets of the last position have no MTP target and are left out. The batch is `lm_loss`'s (LM_BATCH_AXES).
"""

import jax

from pangu.models.config import TransformerConfig
from pangu.models.transformer import Decoder, cross_entropy_loss
from pangu.nn.moe import MOE_COLLECTION
from pangu.train.config import TrainConfig
from pangu.train.losses import Batch, LossFn, Metrics, add_moe_losses


def mtp_loss(model_config: TransformerConfig, train_config: TrainConfig, *, mtp_weight: float = 0.3) -> LossFn:
  """The main LM loss plus mtp_weight times the MTP block's cross entropy (metrics: those of `lm_loss` and
  `mtp_ce`). Needs model_config.mtp_layers=1. Deterministic: the rng is unused."""
  if not model_config.mtp_layers:
    raise ValueError("mtp_loss needs TransformerConfig.mtp_layers=1")
  if not mtp_weight >= 0:
    raise ValueError(f"mtp_loss: mtp_weight must be >= 0, got {mtp_weight!r}")
  model = Decoder(model_config)

  def forward(module: Decoder, inputs: jax.Array, targets: jax.Array):
    logits, _, state = module.run(inputs)
    return logits, module.mtp_logits(state.x, targets)

  def loss_fn(params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
    del rng
    (logits, mtp_logits), variables = model.apply({"params": params}, batch["inputs"], batch["targets"],
                                                  method=forward, mutable=[MOE_COLLECTION])
    loss, metrics = cross_entropy_loss(logits, batch["targets"], batch["mask"], z_loss=train_config.z_loss)
    mtp_ce, _ = cross_entropy_loss(mtp_logits[:, :-1], batch["targets"][:, 1:], batch["mask"][:, 1:])
    loss = loss + mtp_weight * mtp_ce
    metrics["mtp_ce"] = mtp_ce
    if model_config.moe is not None:
      loss = add_moe_losses(loss, metrics, variables[MOE_COLLECTION])
    return loss, metrics

  return loss_fn
