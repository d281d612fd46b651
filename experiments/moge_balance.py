"""MoGE vs top-K load balance: the Imbalance Score distribution and expert-parallel training on 8 CPU devices.

  python -m experiments.moge_balance --quick

Pangu Pro MoE (arXiv 2505.21411), spec pangu_pro_moe.md section 4:
1. Monte-Carlo Imbalance Score (Eq. 3-4) at N = 64 experts, K = 8, M = 8 devices, |X| = 16 tokens, each token's
   router logits i.i.d. normal: plain top-K then draws a uniform set of K distinct experts, MoGE one expert per
   group. Prediction: P(IS > 0) ~ 1 for top-K, IS = 0 exactly for MoGE. A sweep over |X| (ours) shows the top-K
   score shrinking as batches grow.
2. Two small MoE LMs with equal total and active parameters (N = 64, K = 8, the same expert width and shared
   expert, aux loss alpha = 1e-2 on global scores), top-K vs MoGE, same data, seed and steps, trained with
   expert parallelism over the mesh's `expert` axis (8 devices, one MoGE group each). Per step: the tokens each
   device's experts process, max/mean device load, the step time; at the end the validation loss and each
   expert's share of its group's tokens (paper: about 1/G = 12.5%). Prediction: MoGE's max/mean load is exactly
   1.0, top-K's above it; quality is comparable. Top-K also runs on MoGE's kind of exchange, a fixed-size
   (capacity-padded) all-to-all at capacity factors 1.0 and 1.25, reporting the fraction of assignments dropped,
   so that step times compare balance and not the exchange; dropless top-K (ring) is the third top-K row.
   Device load is counted in the exchange: the assignments each expert device received and computed (so
   capacity drops are not counted), summed over the batch.

Writes results/moge_balance.json: {"mc": {"topk": {"p_is_gt_0", "mean_is", "histogram"}, "moge": {...},
"sweep": {...}}, "train": {"topk": {"max_over_mean_device_load", "step_time_s", "val_loss", ...}, "moge": {...}},
"setup": {...}}, moge_balance.png (IS histogram, device load over training, training loss) and the tables as
moge_balance.md.
"""

import statistics

from absl import app, flags

from experiments import common

_DRAWS = flags.DEFINE_integer("draws", None, "Monte-Carlo batches per router (default 20000, --quick 2000).",
                              lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", None, "Training steps per model (default 300, --quick 40).", lower_bound=2)
_WIDTH = flags.DEFINE_integer("width", 64, "Model width D of the trained LMs.", lower_bound=8)
_EXPERT_DIM = flags.DEFINE_integer("expert_dim", 16, "Routed expert width F.", lower_bound=1)

NUM_EXPERTS, TOP_K, NUM_GROUPS, MC_BATCH = 64, 8, 8, 16
SWEEP_BATCHES = (1, 4, 16, 64, 256, 1024)
ROUTERS = ("topk", "moge")
# Trained runs: name -> (router, capacity factor or None for dropless). The capacity rows put top-K on the same
# kind of exchange as MoGE (a fixed-size all-to-all), so the step times compare balance, not exchanges.
RUNS = {"topk": ("topk", None), "topk_cf1.0": ("topk", 1.0), "topk_cf1.25": ("topk", 1.25), "moge": ("moge", None)}
SEQ_LEN, BATCH, LAYERS = 128, 16, 2


def imbalance_scores(router: str, draws: int, tokens: int, seed: int):
  """IS of `draws` random batches of `tokens` tokens, routed by `router` on i.i.d. normal logits."""
  import jax

  from pangu.nn import moe

  def one_batch(key):
    logits = jax.random.normal(key, (tokens, NUM_EXPERTS))
    if router == "moge":
      _, ids = moe.moge_route(logits, num_groups=NUM_GROUPS, k_per_group=TOP_K // NUM_GROUPS)
    else:
      _, ids = moe.topk_route(logits, k=TOP_K)
    return moe.imbalance_score(ids, num_experts=NUM_EXPERTS, num_devices=NUM_GROUPS)

  keys = jax.random.split(jax.random.key(seed), draws)
  return jax.device_get(jax.jit(jax.vmap(one_batch))(keys))


def monte_carlo(draws: int) -> dict:
  import numpy as np

  out = {}
  for seed, router in enumerate(ROUTERS):
    scores = imbalance_scores(router, draws, MC_BATCH, seed)
    values, counts = np.unique(np.round(scores * MC_BATCH).astype(int), return_counts=True)
    out[router] = {"p_is_gt_0": float(np.mean(scores > 0)), "mean_is": float(np.mean(scores)),
                   "histogram": {f"{v / MC_BATCH:g}": c / draws for v, c in zip(values, counts)}}
  out["sweep"] = {}
  for tokens in SWEEP_BATCHES:
    scores = imbalance_scores("topk", max(draws // 10, 100), tokens, seed=100 + tokens)
    out["sweep"][str(tokens)] = {"topk_p_is_gt_0": float(np.mean(scores > 0)), "topk_mean_is": float(np.mean(scores))}
  return out


def model_config(router: str, capacity_factor: float | None = None):
  from pangu import models
  from pangu.nn import moe

  dispatch = dict(dispatch="dropless") if capacity_factor is None else dict(dispatch="capacity",
                                                                            capacity_factor=capacity_factor)
  sparse = moe.MoEConfig(num_experts=NUM_EXPERTS, top_k=TOP_K, expert_dim=_EXPERT_DIM.value, router=router,
                         num_groups=NUM_GROUPS, num_shared_experts=1, aux_loss_coef=1e-2, **dispatch)
  width = _WIDTH.value
  return models.TransformerConfig(vocab_size=384, d_model=width, n_layers=LAYERS, n_heads=4, n_kv_heads=2,
                                  d_ff=TOP_K * _EXPERT_DIM.value + _EXPERT_DIM.value, moe=sparse)


def train_router(router: str, capacity_factor: float | None, steps: int, mesh, train_data, val_data) -> dict:
  import jax
  import numpy as np

  from pangu import data, models
  from pangu.nn import moe
  from pangu.train.config import TrainConfig
  from pangu.train.loop import LoopConfig, train

  config = model_config(router, capacity_factor)
  train_config = TrainConfig(peak_lr=3e-3, end_lr=3e-4, warmup_steps=min(20, steps // 4), total_steps=steps)
  batches = data.BatchIterator(train_data, global_batch_size=BATCH, seed=0)
  state, history = train(config, train_config, LoopConfig(steps=steps, seed=0), batches, mesh)

  @jax.jit
  def evaluate(params, batch):
    logits, variables = models.Decoder(config).apply({"params": params}, batch["inputs"],
                                                     mutable=[moe.MOE_COLLECTION])
    loss, _ = models.cross_entropy_loss(logits, batch["targets"], batch["mask"])
    return loss, moe.moe_metrics(variables[moe.MOE_COLLECTION])["expert_load"]

  evaluated = [evaluate(state.params, b)
               for b in data.eval_batches(val_data, global_batch_size=BATCH, max_batches=8)]
  expert_load = sum(np.asarray(load) for _, load in evaluated)  # [layers, N]
  grouped = expert_load.reshape(LAYERS, NUM_GROUPS, -1)
  share = grouped / grouped.sum(axis=-1, keepdims=True)
  # Step 0 includes compilation.
  step_times = [h["tokens"] / h["tokens_per_s"] for h in history[1:]]
  assignments = BATCH * SEQ_LEN * TOP_K * LAYERS  # per step
  return {
      "router": router,
      "exchange": moe.exchange_for(config.moe, mesh.shape["expert"]),
      "capacity_factor": capacity_factor,
      "dropped_fraction": float(np.mean([h["moe_dropped"] for h in history])) / assignments,
      "max_over_mean_device_load": float(np.mean([h["moe_max_over_mean_device_load"] for h in history])),
      "final_max_over_mean_device_load": history[-1]["moe_max_over_mean_device_load"],
      "mean_imbalance_score": float(np.mean([h["moe_imbalance_score"] for h in history])),
      "step_time_s": statistics.median(step_times),
      "val_loss": float(np.mean([float(loss) for loss, _ in evaluated])),
      "final_train_loss": float(np.mean([h["ce"] for h in history[-10:]])),
      "expert_share_in_group": {"min": float(share.min()), "max": float(share.max()),
                                "mean": float(share.mean())},
      "params": {"total": models.param_count(config), "active": models.active_param_count(config)},
      "device_load_curve": [h["moe_device_load"] for h in history],
      "max_over_mean_curve": [h["moe_max_over_mean_device_load"] for h in history],
      "loss_curve": [h["ce"] for h in history],
  }


def plot(mc: dict, trained: dict) -> None:
  fig, axes = common.new_figure(ncols=3, size=(5, 3.5))
  for i, router in enumerate(ROUTERS):
    hist = mc[router]["histogram"]
    axes[0, 0].bar([float(v) + (i - 0.5) / (2 * MC_BATCH) for v in hist], list(hist.values()),
                   width=1 / (2 * MC_BATCH), label=router)
  axes[0, 0].set(xlabel="Imbalance Score", ylabel="probability",
                 title=f"IS, N={NUM_EXPERTS} K={TOP_K} M={NUM_GROUPS} |X|={MC_BATCH}")
  for router, r in trained.items():
    axes[0, 1].plot(r["max_over_mean_curve"], label=router, lw=1)
    axes[0, 2].plot(r["loss_curve"], label=router, lw=1)
  axes[0, 1].set(xlabel="step", ylabel="max / mean device load", title="expert-parallel load, 8 devices")
  axes[0, 2].set(xlabel="step", ylabel="training cross-entropy", title="quality")
  for ax in axes[0]:
    ax.legend(fontsize=8)
  common.save_figure(fig, "moge_balance")


def claims(payload: dict) -> list[dict]:
  """Pangu Pro MoE's balance claims, judged on this payload."""
  mc, trained = payload["mc"], payload["train"]
  is_zero = mc["moge"]["mean_is"] == 0 and mc["topk"]["p_is_gt_0"] > 0.9
  moge_load, topk_load = (trained[r]["max_over_mean_device_load"] for r in ("moge", "topk"))
  loss_gap = (trained["moge"]["val_loss"] - trained["topk"]["val_loss"]) / trained["topk"]["val_loss"]
  return [
      common.claim("Pangu Pro MoE", "MoGE's Imbalance Score is exactly 0; top-K's is almost always > 0",
                   "P(IS > 0) ~ 1 for top-K (Fig. 2)",
                   f"P(IS > 0): top-K {mc['topk']['p_is_gt_0']:.3f}, MoGE {mc['moge']['p_is_gt_0']:.3f}",
                   "reproduced" if is_zero else "not reproduced"),
      common.claim("Pangu Pro MoE", "MoGE balances the expert-parallel devices exactly", "max/mean load 1.0",
                   f"max/mean device load: MoGE {moge_load:.3f}, top-K {topk_load:.3f}",
                   "reproduced" if moge_load == 1.0 and topk_load > 1.0 else
                   "partly" if moge_load < topk_load else "not reproduced"),
      common.claim("Pangu Pro MoE", "Balanced by construction, MoGE drops nothing on a fixed-size exchange where "
                   "top-K must drop or pad", "no capacity factor needed",
                   f"dropped: MoGE {trained['moge']['dropped_fraction']:.2%}, top-K at CF 1.0 "
                   f"{trained['topk_cf1.0']['dropped_fraction']:.2%}, CF 1.25 "
                   f"{trained['topk_cf1.25']['dropped_fraction']:.2%}; step time MoGE "
                   f"{trained['moge']['step_time_s']:.3f} s vs top-K CF 1.25 {trained['topk_cf1.25']['step_time_s']:.3f} s",
                   "reproduced" if trained["moge"]["dropped_fraction"] == 0 < trained["topk_cf1.0"]["dropped_fraction"]
                   else "not reproduced"),
      common.claim("Pangu Pro MoE", "at comparable quality", "MoGE on par with top-K",
                   f"val loss MoGE {trained['moge']['val_loss']:.3f} vs top-K {trained['topk']['val_loss']:.3f} "
                   f"({100 * loss_gap:+.1f}%)",
                   "reproduced" if loss_gap <= 0.02 else "partly" if loss_gap <= 0.05 else "not reproduced"),
  ]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  from pangu import data
  from pangu.parallel import cpu_mesh

  quick = common.QUICK.value
  draws = common.pick(_DRAWS, 20_000, 2000)
  steps = common.pick(_STEPS, 300, 40)
  mc = monte_carlo(draws)

  tokenizer = data.ByteTokenizer()
  train_data = data.LMDataset.build(tokenizer, data.CorpusConfig(max_files=200 if quick else None), split="train",
                                    seq_len=SEQ_LEN)
  val_data = data.LMDataset.build(tokenizer, data.CorpusConfig(), split="validation", seq_len=SEQ_LEN)
  mesh = cpu_mesh(expert=len(jax.devices()))
  trained = {name: train_router(router, factor, steps, mesh, train_data, val_data)
             for name, (router, factor) in RUNS.items()}

  keys = ("max_over_mean_device_load", "step_time_s", "val_loss")
  payload = {
      "mc": mc,
      "train": trained,
      "setup": {"num_experts": NUM_EXPERTS, "top_k": TOP_K, "num_groups": NUM_GROUPS, "mc_batch": MC_BATCH,
                "draws": draws, "steps": steps, "width": _WIDTH.value, "expert_dim": _EXPERT_DIM.value,
                "layers": LAYERS, "seq_len": SEQ_LEN, "batch": BATCH, "expert_parallel_devices": len(jax.devices()),
                "aux_loss_coef": 1e-2, "quick": quick, **common.machine_info()},
  }
  payload["claims"] = claims(payload)
  common.write_json("moge_balance", payload)
  plot(mc, trained)
  mc_rows = [{"router": r, **{k: mc[r][k] for k in ("p_is_gt_0", "mean_is")}} for r in ROUTERS]
  train_rows = [{"run": r, "router": v["router"], "exchange": v["exchange"], "capacity_factor": v["capacity_factor"],
                 "dropped_fraction": v["dropped_fraction"], **{k: v[k] for k in keys},
                 "mean_imbalance_score": v["mean_imbalance_score"]} for r, v in trained.items()]
  common.write_table("moge_balance", "\n\n".join([
      f"Monte-Carlo Imbalance Score, |X| = {MC_BATCH} tokens, {draws} batches:",
      common.format_table(mc_rows, ["router", "p_is_gt_0", "mean_is"]),
      f"Training, {steps} steps, expert parallelism over {len(jax.devices())} devices:",
      common.format_table(train_rows, ["run", "router", "exchange", "capacity_factor", "dropped_fraction", *keys,
                                       "mean_imbalance_score"])]))


if __name__ == "__main__":
  app.run(main)
