"""Training SDTP's predictors on a frozen LM: saliency targets, masked forward, losses and a train step.

Spec sections 3.3-3.5. A training sequence is a prunable prompt of `prompt_length` tokens followed by a target
suffix that is never pruned; the batch is the LM batch ({"inputs", "targets", "mask"} [B, S]) whose mask marks
where the LM loss is taken (the suffix).

  1. Saliency (Eq. 3): the full model's loss T, differentiated with respect to the hidden states entering every
     pruning layer in one backward pass: the stage hook multiplies the states by (1 + probe) with probe = 0, so
     dT/dprobe = x * dT/dx (gradient x input, elementwise), which `SDTPConfig.saliency_reduce` reduces over D
     to one score per token, normalised per row by its largest prompt-token value (t in [0, 1]).
  2. Masked forward (DynamicViT-style): every stage samples keep / drop with Gumbel noise, keeps the top
     round(r^(s+1) N) prompt tokens by noisy score among those alive (forced tokens always), and hides the
     others as keys from every later layer by giving them position -1 (the attention mask's "empty slot"); their
     states still flow but reach nothing. The hard keep mask passes gradients straight through the Gumbel-softmax
     keep probability by scaling each live token's state by (hard + soft - stop_gradient(soft)), whose value is 1.
  3. Losses (Eq. 4-8, unit weights): L_cls, the LM cross entropy of the masked model on the suffix; L_mse, mean
     (sigmoid(score) - t)^2 over the prunable live tokens of each stage; L_r, the pairwise ranking loss
     (`ranking_loss`). The stage sums are averaged over stages.

Only the predictors train, through the shared train step (pangu.train.step): `predictor_training` gives it the
predictors as the model (`TrainModel`: their init, one gradient norm per stage) and `predictor_loss` as the
injected loss, with the frozen LM's params closed over (under `stop_gradient`), never part of the train state.
"""

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from pangu.infer.sdtp.predictor import KEEP, boxed_predictors, keep_scores, predictor_logits
from pangu.infer.sdtp.schedule import RANK_PAIR_WEIGHTS, SDTPConfig, forced_mask, select_tokens
from pangu.models.config import TransformerConfig
from pangu.models.stages import LayerStages, TokenState
from pangu.models.transformer import Decoder, cross_entropy_loss, forward_in_stages
from pangu.train.config import TrainConfig
from pangu.train.losses import LossFn
from pangu.train.step import TrainModel, TrainState, init_train_state, make_train_step

Batch = dict[str, jax.Array]


def reduce_saliency(x_times_grad: jax.Array, reduce: str) -> jax.Array:
  """[..., D] gradient x input -> [...] one score per token (see `SDTPConfig.saliency_reduce`)."""
  if reduce == "abs_sum":
    return jnp.abs(x_times_grad.sum(-1))
  if reduce == "signed_sum":
    return x_times_grad.sum(-1)
  if reduce == "l2":
    return jnp.sqrt(jnp.square(x_times_grad).sum(-1))
  raise ValueError(f"unknown saliency reduction {reduce!r}")


def saliency(model_config: TransformerConfig, config: SDTPConfig, lm_params: dict, batch: Batch,
             prompt_length: int) -> jax.Array:
  """[n_stages, B, S] normalised saliency of every prompt token at the input of each pruning layer (0 after the
  prompt), from the full, unpruned model in float32."""
  tokens = batch["inputs"]
  chex.assert_rank(tokens, 2)
  lm_params = jax.lax.stop_gradient(lm_params)
  probes = jnp.zeros((config.n_stages, *tokens.shape, model_config.d_model), jnp.float32)
  stages = LayerStages(config.layers, lambda s, state, p: state.replace(x=state.x * (1 + p[s]).astype(state.x.dtype)))

  def loss(probes):
    logits, _ = forward_in_stages(model_config, lm_params, tokens, stages, probes)
    return cross_entropy_loss(logits, batch["targets"], batch["mask"])[0]

  scores = reduce_saliency(jax.grad(loss)(probes), config.saliency_reduce)
  scores = jnp.where(jnp.arange(tokens.shape[1]) < prompt_length, scores, 0.0)
  top = jnp.max(jnp.abs(scores), axis=-1, keepdims=True)
  return scores / jnp.maximum(top, 1e-30)


def ranking_loss(scores: jax.Array, targets: jax.Array, valid: jax.Array, pair_weight: str = "uniform") -> jax.Array:
  """Pairwise logistic (RankNet) loss, spec Eq. 5-8: per row, the weighted mean over pairs i < j of valid tokens
  of softplus(-(s_i - s_j) sign(t_i - t_j)), then the mean over rows (a row without weight counts 0). Weights
  (`SDTPConfig.rank_pair_weight`): 1 per pair ("uniform", the spec's) or |t_i - t_j| ("target_gap").

  scores, targets: [B, S] float; valid: bool [B, S]. O(S^2) memory per row.
  """
  chex.assert_equal_shape([scores, targets, valid])
  diff = scores[:, :, None] - scores[:, None, :]
  gap = targets[:, :, None] - targets[:, None, :]
  upper = jnp.triu(jnp.ones(scores.shape[1:] * 2, bool), k=1)
  pairs = valid[:, :, None] & valid[:, None, :] & upper
  if pair_weight == "uniform":
    weight = pairs.astype(scores.dtype)
  elif pair_weight == "target_gap":
    weight = jnp.where(pairs, jnp.abs(gap), 0.0)
  else:
    raise ValueError(f"ranking_loss: pair_weight must be one of {RANK_PAIR_WEIGHTS}, got {pair_weight!r}")
  per_pair = jnp.where(pairs, weight * jax.nn.softplus(-diff * jnp.sign(gap)), 0.0)
  return jnp.mean(per_pair.sum((1, 2)) / jnp.maximum(weight.sum((1, 2)), 1e-12))


def sdtp_loss(model_config: TransformerConfig, config: SDTPConfig, prompt_length: int
              ) -> Callable[[dict, dict, Batch, jax.Array], tuple[jax.Array, dict]]:
  """loss(predictors, lm_params, batch, rng) -> (L_cls + L_mse + L_r, metrics), differentiable in the predictors.

  Metrics: loss, cls, mse, rank, kept_fraction (prompt tokens alive after the last stage).
  """
  config.check_depth(model_config.n_layers)
  counts = config.keep_counts(prompt_length)

  def loss_fn(predictors: dict, lm_params: dict, batch: Batch, rng: jax.Array):
    tokens = batch["inputs"]
    suffix = tokens.shape[1] - prompt_length
    if suffix < 0:
      raise ValueError(f"sdtp_loss: sequences of {tokens.shape[1]} tokens are shorter than the prompt "
                       f"({prompt_length})")
    lm_params = jax.lax.stop_gradient(lm_params)
    targets = jax.lax.stop_gradient(saliency(model_config, config, lm_params, batch, prompt_length))
    recorded = []  # (scores, prunable live tokens) of each stage, read once the forward has run

    def hook(stage: int, state: TokenState, _) -> TokenState:
      logits = predictor_logits(predictors, stage, state.x)
      noisy = logits + jax.random.gumbel(jax.random.fold_in(rng, stage), logits.shape)
      soft = jax.nn.softmax(noisy / config.gumbel_tau, axis=-1)[..., KEEP]
      keep = select_tokens(config, keep_scores(noisy), state.positions, prompt_length, counts[stage] + suffix)
      hard = jnp.any(jnp.arange(state.x.shape[1])[None, :, None] == keep[:, None, :], axis=-1)
      live = state.positions >= 0
      prunable = live & ~forced_mask(config, state.positions, prompt_length)
      recorded.append((keep_scores(logits), prunable))
      gate = jnp.where(prunable, hard + soft - jax.lax.stop_gradient(soft), 1.0)
      return state.replace(x=state.x * gate[..., None].astype(state.x.dtype),
                           positions=jnp.where(hard & live, state.positions, -1))

    # Not the jitted forward_in_stages: the hook's recorded arrays must stay in this trace.
    stages = LayerStages(config.layers, hook)
    logits, _, final = Decoder(model_config).apply({"params": lm_params}, tokens, stages=stages, method=Decoder.run)
    cls = cross_entropy_loss(logits, batch["targets"], batch["mask"])[0]
    mse = sum(jnp.sum(jnp.where(p, jnp.square(jax.nn.sigmoid(s) - t), 0.0)) / jnp.maximum(p.sum(), 1)
              for (s, p), t in zip(recorded, targets)) / config.n_stages
    rank = sum(ranking_loss(s, t, p, config.rank_pair_weight) for (s, p), t in zip(recorded, targets)) / config.n_stages
    alive = jnp.mean(jnp.sum((final.positions >= 0) & (final.positions < prompt_length), axis=1)) / prompt_length
    loss = cls + mse + rank
    return loss, {"loss": loss, "cls": cls, "mse": mse, "rank": rank, "kept_fraction": alive}

  return loss_fn


def predictor_loss(model_config: TransformerConfig, config: SDTPConfig, prompt_length: int,
                   lm_params: dict) -> LossFn:
  """`sdtp_loss` as the shared step's `LossFn` of the predictors: loss(predictors, batch, rng), the frozen LM's
  params closed over (like kd_loss's teacher). Metrics: cls, mse, rank, kept_fraction (the step adds loss)."""
  loss_fn = sdtp_loss(model_config, config, prompt_length)

  def loss(predictors: dict, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
    value, metrics = loss_fn(predictors, lm_params, batch, rng)
    return value, {k: v for k, v in metrics.items() if k != "loss"}

  return loss


def predictor_train_model(model_config: TransformerConfig, config: SDTPConfig) -> TrainModel:
  """The predictors as the shared step's model: their (logically partitioned) init, and one gradient norm per
  stage as `per_layer_grad_norm`."""
  return TrainModel(
      init_params=lambda rng: boxed_predictors(config, model_config.d_model, rng),
      layer_grad_norms=lambda grads: jnp.stack([optax.tree.norm(grads[f"stage_{s}"]) for s in range(config.n_stages)]))


def predictor_training(model_config: TransformerConfig, config: SDTPConfig, prompt_length: int, lm_params: dict,
                       train_config: TrainConfig, mesh: Mesh, rng: jax.Array
                       ) -> tuple[TrainState, Callable[[TrainState, Batch], tuple[TrainState, dict]]]:
  """(state, step) training the predictors with the shared train step (`pangu.train.step`): state.params are
  the predictors, the batch is the LM batch (inputs, targets, mask), step(state, batch) -> (state, metrics)
  with the step's metrics and `sdtp_loss`'s. The LM params are an input of the loss only, so nothing but the
  predictors can change."""
  model = predictor_train_model(model_config, config)
  state = init_train_state(model, train_config, rng, mesh)
  step = make_train_step(model, train_config, mesh,
                         loss_fn=predictor_loss(model_config, config, prompt_length, lm_params))
  return state, step
