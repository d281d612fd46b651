"""Pangu Ultra MoE's EP-group balance loss vs balancing each device's micro-batch and the global batch.

  python -m experiments.balance_scope --quick

Spec pangu_ultra_moe.md section 4.5 (the formula of the EP-group loss is our reading): the same small top-K
MoE LM, same data, seed and steps, trained on a (data = 2, expert = 4) CPU mesh with the balance loss alpha *
sum_i f_i p_i taken over each device's tokens (`microbatch`), over each expert-parallel group's tokens
(`ep_group`) or over the whole batch (`global_batch`); see `pangu.nn.moe.MoEConfig.balance_scope`. After
training, on validation text:
- balance per EP group: each EP group's tokens (one data shard) routed, the max / mean load over its 4 expert
  devices, averaged over groups, batches and layers (1.0 = balanced);
- specialisation: per text domain of the held-out Python files (code lines, and comment lines, which are English
  prose; the corpus has almost no other prose), the entropy of the expert-usage distribution, normalised by
  log N and averaged over layers (lower = the domain uses fewer experts, i.e. experts specialise), and the
  Jensen-Shannon divergence between the two domains' usage.
Paper's claim (README, secondary): the EP-group loss gives better specialisation at similar balance than the
micro-batch loss.

Writes <results_dir>/balance_scope.json: {"scopes": {scope: {"val_loss", "ep_group_max_over_mean_load",
"domain_entropy": {domain: value}, "domain_js_divergence", "loss_curve"}}, "claims", "setup"}, a PNG and a table.
"""

from absl import app, flags

from experiments import common

_STEPS = flags.DEFINE_integer("steps", None, "Training steps per scope (default 300, --quick 30).", lower_bound=2)
_AUX = flags.DEFINE_float("aux_loss_coef", 1e-2, "alpha of the balance loss (spec: 1e-2).", lower_bound=0.0)

SCOPES = ("microbatch", "ep_group", "global_batch")
NUM_EXPERTS, TOP_K, EXPERT_DIM, WIDTH, LAYERS = 16, 2, 32, 64, 2
SEQ_LEN, BATCH, DATA, EXPERT = 128, 16, 2, 4
DOMAINS = ("code", "prose")


def model_config(scope: str, aux_loss_coef: float):
  from pangu import models
  from pangu.nn import moe

  sparse = moe.MoEConfig(num_experts=NUM_EXPERTS, top_k=TOP_K, expert_dim=EXPERT_DIM, router="topk",
                         aux_loss_coef=aux_loss_coef, balance_scope=scope)
  return models.TransformerConfig(vocab_size=384, d_model=WIDTH, n_layers=LAYERS, n_heads=4, n_kv_heads=2,
                                  d_ff=4 * WIDTH, moe=sparse)


def domain_rows(max_rows: int) -> dict:
  """domain -> int32 [R, SEQ_LEN] rows of validation text of that domain (byte tokens): comment lines of the
  validation .py files as prose, their other non-blank lines as code."""
  import numpy as np
  from pangu import data

  tokenizer = data.ByteTokenizer()
  lines = [line.strip() for name, text in data.named_documents(data.CorpusConfig(), "validation")
           if name.endswith(".py") for line in text.splitlines() if line.strip()]
  text = {"prose": "\n".join(line.lstrip("# ") for line in lines if line.startswith("#")),
          "code": "\n".join(line for line in lines if not line.startswith("#"))}
  out = {}
  for domain in DOMAINS:
    ids = tokenizer.encode(text[domain])[: max_rows * SEQ_LEN]
    if len(ids) < SEQ_LEN:
      raise ValueError(f"the validation split has fewer than {SEQ_LEN} tokens of {domain} text")
    out[domain] = np.asarray(ids[: len(ids) // SEQ_LEN * SEQ_LEN], np.int32).reshape(-1, SEQ_LEN)
  return out


def routing_statistics(config, params, val_batches: list, domains: dict) -> dict:
  """EP-group balance on validation batches and per-domain expert usage (see the module docstring)."""
  import numpy as np
  from pangu import models

  ratios = []
  per_device = NUM_EXPERTS // EXPERT
  for batch in val_batches:
    for ids in models.routed_expert_ids(config, params, batch["inputs"]).values():
      for group in np.split(np.asarray(ids), DATA):  # the batch is split data-major: one EP group per shard
        load = np.bincount(group.reshape(-1) // per_device, minlength=EXPERT)
        ratios.append(load.max() / load.mean())
  usage = {}
  for domain, rows in domains.items():
    ids = models.routed_expert_ids(config, params, rows)
    usage[domain] = np.stack([np.bincount(np.asarray(v).reshape(-1), minlength=NUM_EXPERTS) for v in ids.values()])
  entropy = lambda p: -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1)
  share = {d: u / u.sum(axis=-1, keepdims=True) for d, u in usage.items()}
  mix = (share["code"] + share["prose"]) / 2
  js = entropy(mix) - (entropy(share["code"]) + entropy(share["prose"])) / 2
  return {"ep_group_max_over_mean_load": float(np.mean(ratios)),
          "domain_entropy": {d: float(np.mean(entropy(s)) / np.log(NUM_EXPERTS)) for d, s in share.items()},
          "domain_js_divergence": float(np.mean(js))}


def train_scope(scope: str, steps: int, mesh, train_data, val_batches: list, domains: dict) -> dict:
  import jax
  import numpy as np
  from pangu import data, models
  from pangu.train.config import TrainConfig
  from pangu.train.loop import LoopConfig, train

  config = model_config(scope, _AUX.value)
  train_config = TrainConfig(peak_lr=3e-3, end_lr=3e-4, warmup_steps=min(20, steps // 4), total_steps=steps)
  batches = data.BatchIterator(train_data, global_batch_size=BATCH, seed=0)
  state, history = train(config, train_config, LoopConfig(steps=steps, seed=0), batches, mesh)
  params = jax.device_get(state.params)
  losses = [models.cross_entropy_loss(models.forward(config, params, b["inputs"]), b["targets"], b["mask"])[0]
            for b in val_batches]
  return {"val_loss": float(np.mean(losses)), **routing_statistics(config, params, val_batches, domains),
          "loss_curve": [h["ce"] for h in history]}


def claims(payload: dict) -> list[dict]:
  """The EP-group loss specialises more (lower domain entropy, higher JS) than micro-batch at similar balance."""
  ep, micro = payload["scopes"]["ep_group"], payload["scopes"]["microbatch"]
  mean_entropy = lambda r: sum(r["domain_entropy"].values()) / len(r["domain_entropy"])
  more_special = mean_entropy(ep) < mean_entropy(micro) and ep["domain_js_divergence"] > micro["domain_js_divergence"]
  similar_balance = ep["ep_group_max_over_mean_load"] <= 1.1 * micro["ep_group_max_over_mean_load"]
  verdict = ("reproduced" if more_special and similar_balance else "partly" if more_special or similar_balance
             else "not reproduced")
  return [common.claim(
      "Pangu Ultra MoE", "EP-group balance loss: better expert specialisation at similar balance than micro-batch",
      "qualitative (README, secondary)",
      f"domain entropy {mean_entropy(ep):.3f} vs {mean_entropy(micro):.3f}, JS {ep['domain_js_divergence']:.4f} vs "
      f"{micro['domain_js_divergence']:.4f}, EP-group max/mean load {ep['ep_group_max_over_mean_load']:.3f} vs "
      f"{micro['ep_group_max_over_mean_load']:.3f} (ep_group vs microbatch)", verdict)]


def plot(scopes: dict) -> None:
  fig, axes = common.new_figure(ncols=2, size=(5, 3.5))
  for scope, r in scopes.items():
    axes[0, 0].plot(r["loss_curve"], label=scope)
    axes[0, 1].scatter(r["ep_group_max_over_mean_load"], sum(r["domain_entropy"].values()) / 2, label=scope)
  axes[0, 0].set(xlabel="step", ylabel="train cross entropy", title="training")
  axes[0, 1].set(xlabel="EP-group max / mean device load", ylabel="mean domain usage entropy / log N",
                 title="balance vs specialisation")
  axes[0, 0].legend(fontsize=7)
  axes[0, 1].legend(fontsize=7)
  common.save_figure(fig, "balance_scope")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from pangu import data
  from pangu.parallel import cpu_mesh

  quick = common.QUICK.value
  steps = common.pick(_STEPS, 300, 30)
  tokenizer = data.ByteTokenizer()
  train_data = data.LMDataset.build(tokenizer, data.CorpusConfig(max_files=200 if quick else None), split="train",
                                    seq_len=SEQ_LEN)
  val_data = data.LMDataset.build(tokenizer, data.CorpusConfig(), split="validation", seq_len=SEQ_LEN)
  val_batches = list(data.eval_batches(val_data, global_batch_size=BATCH, max_batches=4 if quick else 16))
  domains = domain_rows(max_rows=16 if quick else 64)
  mesh = cpu_mesh(data=DATA, expert=EXPERT)
  scopes = {scope: train_scope(scope, steps, mesh, train_data, val_batches, domains) for scope in SCOPES}
  payload = {"scopes": scopes,
             "setup": {"steps": steps, "num_experts": NUM_EXPERTS, "top_k": TOP_K, "expert_dim": EXPERT_DIM,
                       "width": WIDTH, "layers": LAYERS, "seq_len": SEQ_LEN, "batch": BATCH,
                       "mesh": {"data": DATA, "expert": EXPERT}, "aux_loss_coef": _AUX.value,
                       "domains": "validation .py files: comment lines (prose) vs other lines (code)",
                       "quick": quick, **common.machine_info()}}
  payload["claims"] = claims(payload)
  common.write_json("balance_scope", payload)
  plot(scopes)
  rows = [{"scope": s, "val_loss": r["val_loss"], "ep_group_max_over_mean": r["ep_group_max_over_mean_load"],
           **{f"entropy_{d}": v for d, v in r["domain_entropy"].items()}, "js_code_prose": r["domain_js_divergence"]}
          for s, r in scopes.items()]
  common.write_table("balance_scope", "\n\n".join([
      f"Balance scope, top-{TOP_K} of {NUM_EXPERTS} experts, {steps} steps on a data={DATA} x expert={EXPERT} mesh:",
      common.format_table(rows, ["scope", "val_loss", "ep_group_max_over_mean", "entropy_code", "entropy_prose",
                                 "js_code_prose"])]))


if __name__ == "__main__":
  app.run(main)
