"""Knowledge distillation as a `LossFn`: recovery of a pruned model from its unpruned teacher (Pangu Light spec 3.6,
Minitron-style logit KD), trained by the shared step (`make_train_step(..., loss_fn=kd_loss(...))`).

  loss = T^2 * KL(p_teacher^T || p_student^T) + ce_weight * CE(student) + hidden_weight * MSE(hidden)

over the unmasked next-token positions, with p^T = softmax(logits / T). The teacher runs on the very batch the
student sees, frozen (its params are closed over, not trained, and its outputs pass through stop_gradient). The
optional hidden-state term compares the final-norm outputs, the teacher's restricted to the student's hidden
channels (`hidden_channels`, the kept residual channels of a width-pruned student).

It lives in `pangu.train` beside `lm_loss` because it is a training objective on the `LossFn` contract and needs
only `pangu.models`; `pangu.compress` may not import `pangu.train`, and the pruning code needs no loss.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pangu.models.config import TransformerConfig
from pangu.models.transformer import Decoder, cross_entropy_loss
from pangu.train.losses import Batch, LossFn, Metrics


def _final_norm_only(module, method: str) -> bool:
  return module.name == "final_norm" and method == "__call__"


def _logits_and_hidden(config: TransformerConfig, params, tokens: jax.Array, hidden: bool):
  """[B, S, V] logits and, when asked, the final-norm output [B, S, D]."""
  if not hidden:
    return Decoder(config).apply({"params": params}, tokens), None
  logits, state = Decoder(config).apply({"params": params}, tokens, capture_intermediates=_final_norm_only,
                                        mutable=["intermediates"])
  return logits, state["intermediates"]["final_norm"]["__call__"][0]


def kd_loss(student_config: TransformerConfig, teacher_config: TransformerConfig, teacher_params, *,
            temperature: float = 1.0, ce_weight: float = 0.0, hidden_weight: float = 0.0,
            hidden_channels: Sequence[int] | None = None) -> LossFn:
  """The distillation objective of a student against a frozen teacher, on the LM batch (inputs, targets, mask).

  Args:
    temperature: T of the softened distributions; the KL is scaled by T^2 so its gradients keep their size.
    ce_weight: weight of the student's own next-token cross entropy (spec flag kd_ce_weight, default 0).
    hidden_weight: weight of the final hidden-state MSE (0: off).
    hidden_channels: the teacher's channels the student's hidden state corresponds to (None: all, equal widths).
  Metrics: kd_kl (before the T^2 scale), ce, hidden_mse (with hidden_weight), tokens.
  Raises ValueError for T <= 0, negative weights, mismatched vocabularies or hidden widths.
  """
  if not temperature > 0:
    raise ValueError(f"kd_loss temperature must be > 0, got {temperature!r}")
  if ce_weight < 0 or hidden_weight < 0:
    raise ValueError(f"kd_loss weights must be >= 0, got ce_weight={ce_weight!r}, hidden_weight={hidden_weight!r}")
  if student_config.vocab_size != teacher_config.vocab_size:
    raise ValueError(f"student vocab_size={student_config.vocab_size} differs from the teacher's "
                     f"{teacher_config.vocab_size}: the logit KL needs one vocabulary")
  channels = None if hidden_channels is None else jnp.asarray(hidden_channels, jnp.int32)
  width = teacher_config.d_model if channels is None else channels.shape[0]
  if hidden_weight and width != student_config.d_model:
    raise ValueError(f"the hidden-state loss compares {width} teacher channels with the student's "
                     f"d_model={student_config.d_model}; pass hidden_channels (the student's kept channels)")
  use_hidden = hidden_weight > 0

  def loss_fn(params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
    del rng
    logits, hidden = _logits_and_hidden(student_config, params, batch["inputs"], use_hidden)
    teacher_logits, teacher_hidden = jax.tree.map(
        jax.lax.stop_gradient, _logits_and_hidden(teacher_config, teacher_params, batch["inputs"], use_hidden))
    mask = batch["mask"].astype(jnp.float32)
    tokens = jnp.maximum(mask.sum(), 1.0)
    log_p_student = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    log_p_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    per_token = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    kl = jnp.sum(per_token * mask) / tokens
    ce, ce_metrics = cross_entropy_loss(logits, batch["targets"], batch["mask"])
    loss = temperature ** 2 * kl + ce_weight * ce
    metrics = {"kd_kl": kl, "ce": ce_metrics["ce"], "tokens": ce_metrics["tokens"]}
    if use_hidden:
      target = teacher_hidden if channels is None else teacher_hidden[..., channels]
      per_token = jnp.mean(jnp.square(hidden.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
      metrics["hidden_mse"] = jnp.sum(per_token * mask) / tokens
      loss = loss + hidden_weight * metrics["hidden_mse"]
    return loss, metrics

  return loss_fn
