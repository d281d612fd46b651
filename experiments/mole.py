"""MoLE vs dense vs MoE: quality at equal trainable parameters, and decode latency with experts off the device.

  python -m experiments.mole --quick

Mixture of Lookup Experts (arXiv 2503.15798), spec mole.md section 4:
1. Quality: dense (GELU MLP 4D), MoE-10E (top-2, no shared expert, 40 D^2 expert weights per layer like
   MoLE-4E's 1 + 4 FFNs of 8 D^2), MoLE-4E and MoLE-16E, trained on the embedded corpus (byte tokens) with the
   same data, seed, steps and optimiser; validation loss of each. MoLE is then re-parameterised, and the lookup
   form's logits are compared with the training form's (max abs error per table format).
   The MoE experts are SwiGLU (this codebase's expert) of width 4D/3, so each holds 4 D^2 weights like the
   paper's GELU expert of width 2D: equal total and active parameters, equal bytes per offloaded expert.
2. Decode latency per generated token (one decode step) at batch 1 and 16, all systems interleaved in one run,
   on a larger shape with random weights (--latency_width / --latency_layers; latency does not depend on the
   weights): dense; MoE-34E (pairs with MoLE-16E: 136 D^2 = 17 x 8 D^2) with experts in device memory; the same
   with experts in pinned host memory in the table's dtype, each step copying in the distinct experts its tokens
   chose and running each on exactly the rows routed to it (the paper's offloading baseline, at the FLOPs of
   routing); MoLE-16E with the table (float16 by default, as the paper) in pinned host memory and
   memory-mapped on disk. Every system runs in pangu.infer.decode_layout (unrolled layers, [out, in] kernels,
   MoE experts by the `selected` loop: each expert a step chose runs on its own rows).
   Device-resident bytes of each and bytes moved per generated token (MoLE: one table row, L N D values;
   offloaded MoE: distinct experts per step x expert bytes, from the actual routing of the decoded tokens).
   On a CPU, host and device are the same RAM: "offloading" is a copy, so the bytes are reported beside the times,
   with the time they would take over a host link of --link_gb_per_s (modelled, not measured).
3. Whether random weights stand in for trained ones: latency depends on the weights only through routing (how
   many distinct experts a step loads), so the distinct experts per decode step of the trained MoE-10E are
   measured beside those of the same model at its random initialisation.
4. Hot-row cache (ours, beyond the paper; pangu.nn.hot_rows): the latency MoLE with the table rows of the most
   frequent tokens of the training corpus in device memory, the rest in pinned host memory, for several cache
   sizes from none to the whole vocabulary. Per size: the fraction of validation-text lookups it serves, device
   bytes, bytes that still cross per token (misses, copied in power-of-two buckets) and the modelled link time,
   and the decode latency. The hit rate depends on the tokens, and a random-weight model's own samples are not
   text, so these systems (and dense and cacheless MoLE beside them, in the same interleaved runs) decode the
   validation text teacher-forced: each step's input is the text's next token.

Paper's prediction: MoLE's latency is close to dense and flat in batch, far below offloaded MoE, whose latency
grows with batch (more distinct experts to load), at dense-sized device memory.

Writes <results_dir>/mole.json: {"val_loss": {model: loss}, "lut_max_abs_err", "lut_formats": {...},
"decode_ms_per_token": {model: {"b1", "b16"}} with model in dense, moe, moe_offload, mole_host, mole_disk,
"device_bytes": {...}, "per_token_transfer_bytes": {...}, "systems": {model: {"dtype", "flops_per_token",
"transfer_ms_modelled": {"b1", "b16"}}}, "link_gb_per_s", "distinct_experts_per_step": {"trained", "random"},
"hot_row_cache": {"per_size": [{"fraction", "rows", "hit_rate", "device_bytes", "host_bytes_per_token",
"latency_ms", "transfer_ms_modelled"}], "dense_latency_ms", ...}, "goals": {...}, "setup": {...}},
mole.png (latency vs device bytes, like the paper's Fig. 1; validation loss; the cache sweep) and mole.md.
"""

import statistics
import tempfile
import time

from experiments import xla_host

# One CPU device: decode is timed on one device, and the models train 1.2x faster than on eight fake devices (the
# MoE steps 3x: the data-parallel dispatch only adds overhead on a few cores). An explicit XLA_FLAGS still wins.
xla_host.use_cpu_devices(1)

from absl import app, flags  # noqa: E402

from experiments import common  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", None, "Training steps per model (default 400, --quick 40).", lower_bound=2)
_WIDTH = flags.DEFINE_integer("width", None, "Width D of the trained models (default 96, --quick 48); a "
                              "multiple of 3 so that MoE experts of width 4D/3 hold 4 D^2 weights.", lower_bound=6)
_LAYERS = flags.DEFINE_integer("layers", None, "Layers of the trained models (default 6, --quick 4).", lower_bound=1)
_LATENCY_WIDTH = flags.DEFINE_integer("latency_width", None, "Width of the latency models (default 768, --quick "
                                      "384).", lower_bound=6)
_LATENCY_LAYERS = flags.DEFINE_integer("latency_layers", None, "Layers of the latency models (default 12, --quick "
                                       "4).", lower_bound=1)
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", None, "Decoded tokens per timed run (default 32, --quick 12).",
                                   lower_bound=3)
_TABLE_FORMAT = flags.DEFINE_enum("table_format", "float16", ["float32", "bfloat16", "float16", "int8", "nf4"],
                                  "Table format of the latency MoLE (the paper stores float16).")
_LINK_GB_PER_S = flags.DEFINE_float("link_gb_per_s", 32.0, "Host-to-device link bandwidth (GB/s) the modelled "
                                    "transfer times assume (default: PCIe 4.0 x16 peak).", lower_bound=1e-3)
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed runs per system and batch (default 5, --quick 3).",
                                lower_bound=1)
_CACHE_FRACTIONS = flags.DEFINE_list("cache_fractions", None, "Hot-row cache sizes as fractions of the vocabulary "
                                      "(default 0,1/32,1/16,1/8,1/4,1/2,1; --quick 0,1/8).")

SEQ_LEN, BATCH, PROMPT_LEN, HEADS = 128, 16, 16, 4
LATENCY_BATCHES = (1, 16)
TABLE_FORMATS = ("float32", "bfloat16", "float16", "int8", "nf4")
SYSTEMS = ("dense", "moe", "moe_offload", "mole_host", "mole_disk")
FLOAT_FORMATS = ("float32", "bfloat16", "float16")
# Our claim for the cache, fixed before any run: this fraction of the vocabulary serves >= 90% of lookups.
CLAIM_FRACTION, CLAIM_HIT_RATE = 1 / 8, 0.9


def offload_dtype(table_format: str) -> str:
  """The offloaded experts' host dtype: the table's when it is a float format, else float16 (the paper's)."""
  return table_format if table_format in FLOAT_FORMATS else "float16"


def model_configs(width: int, layers: int, vocab: int, heads: int) -> dict:
  """The four systems at equal trainable FFN parameters (see the module docstring)."""
  from pangu import models
  from pangu.nn.mole import MoLEConfig
  from pangu.nn.moe import MoEConfig

  dense = models.TransformerConfig(vocab_size=vocab, d_model=width, n_layers=layers, n_heads=heads,
                                   n_kv_heads=heads, d_ff=4 * width, mlp_activation="gelu")

  def moe(num_experts):
    return dense.replace(mlp_activation="swiglu", moe=MoEConfig(
        num_experts=num_experts, top_k=2, expert_dim=4 * width // 3, router="topk", aux_loss_coef=1e-2))

  def mole(num_experts):
    return dense.replace(mole=MoLEConfig(num_experts=num_experts, expert_dim=4 * width))

  return {"dense": dense, "moe_10e": moe(10), "moe_34e": moe(34), "mole_4e": mole(4), "mole_16e": mole(16)}


def train_models(configs: dict, steps: int, quick: bool) -> tuple[dict, dict, list, object]:
  """Trains each config on the same batches: name -> (params, validation loss), the validation batches, and how
  often each token occurs in the training split [V]."""
  import jax
  import numpy as np
  from pangu import data, models
  from pangu.parallel import cpu_mesh
  from pangu.train.config import TrainConfig
  from pangu.train.loop import LoopConfig, train

  tokenizer = data.ByteTokenizer()
  train_data = data.LMDataset.build(tokenizer, data.CorpusConfig(max_files=200 if quick else None), split="train",
                                    seq_len=SEQ_LEN)
  val_data = data.LMDataset.build(tokenizer, data.CorpusConfig(), split="validation", seq_len=SEQ_LEN)
  val_batches = list(data.eval_batches(val_data, global_batch_size=BATCH, max_batches=4 if quick else 16))
  mesh = cpu_mesh(data=len(jax.devices()))
  train_config = TrainConfig(peak_lr=3e-3, end_lr=3e-4, warmup_steps=max(steps // 100, 2), total_steps=steps)
  params, val_loss = {}, {}
  for name, config in configs.items():
    batches = data.BatchIterator(train_data, global_batch_size=BATCH, seed=0)
    state, _ = train(config, train_config, LoopConfig(steps=steps, seed=0), batches, mesh)
    params[name] = jax.device_get(state.params)
    losses = [models.cross_entropy_loss(models.forward(config, params[name], b["inputs"]), b["targets"],
                                        b["mask"])[0] for b in val_batches]
    val_loss[name] = float(np.mean(losses))
  packed = train_data.packed
  real = np.arange(packed.rows.shape[1]) < packed.lengths[:, None]
  return params, val_loss, val_batches, np.bincount(packed.rows[real], minlength=configs["dense"].vocab_size)


def lut_errors(configs: dict, params: dict, val_batches: list) -> dict:
  """Per MoLE model and table format: max |lookup logits - training logits| and the lookup model's val loss."""
  import jax

  out = {}
  # Full float32 matmuls on both sides (GPUs default to TF32), so the error is the table's alone.
  with jax.default_matmul_precision("highest"):
    for name in ("mole_4e", "mole_16e"):
      out[name] = _lut_errors(configs[name], params[name], val_batches)
  return out


def _lut_errors(config, params, val_batches: list) -> dict:
  import numpy as np
  from pangu import models
  from pangu.models import mole

  # One row at a time: SEQ_LEN < V tokens, so the training form runs its experts per token, not per vocabulary
  # row as a whole batch would (the table's own computation), and the check stays independent of the table.
  want = [np.concatenate([models.forward(config, params, row[None]) for row in b["inputs"]]) for b in val_batches]
  out = {}
  for table_format in TABLE_FORMATS:
    lut_config, lut_params = mole.reparameterize(config, params, table_format=table_format)
    got = [models.forward(lut_config, lut_params, b["inputs"]) for b in val_batches]
    losses = [models.cross_entropy_loss(g, b["targets"], b["mask"])[0] for g, b in zip(got, val_batches)]
    out[table_format] = {
        "max_abs_err": float(max(np.abs(np.asarray(g) - np.asarray(w)).max() for g, w in zip(got, want))),
        "val_loss": float(np.mean(losses)), "table_bytes": mole.table_bytes(lut_config)}
  return out


def latency_systems(width: int, layers: int, vocab: int, heads: int, table_format: str, table_dir: str) -> dict:
  """name -> (config, params) of the five decode systems, random weights, unrolled layers (decode layout)."""
  import jax
  from pangu import infer, models
  from pangu.infer.offload import offload_experts
  from pangu.models import mole

  configs = model_configs(width, layers, vocab, heads)

  def init(config):
    return infer.decode_layout(config, models.init_params(config, jax.random.key(0)))

  dense, moe = init(configs["dense"]), init(configs["moe_34e"])
  lut = mole.reparameterize(*init(configs["mole_16e"]), table_format=table_format)
  return {"dense": dense, "moe": moe, "moe_offload": offload_experts(*moe, dtype=offload_dtype(table_format)),
          "mole_host": mole.place_table(*lut, "host"),
          "mole_disk": mole.place_table(*lut, "disk", path=f"{table_dir}/mole_16e")}


def device_bytes(params: dict) -> int:
  """Bytes of the params that live in device memory (pinned-host leaves and off-device tables excluded)."""
  import jax
  return sum(x.nbytes for x in jax.tree.leaves(params) if getattr(x, "sharding", None) is None
             or x.sharding.memory_kind in (None, "device"))


def forced_decode(config, gen, params: dict, state, forced):
  """Decode steps whose inputs are forced [B, n] instead of the sampled tokens (teacher forcing); traceable."""
  import jax
  from pangu import infer

  step = lambda state, token: (infer.decode_step(config, gen, params, state.replace(last=token)), None)
  return jax.lax.scan(step, state, forced.T)[0]


def measure_latency(systems: dict, new_tokens: int, repeats: int, forced_systems: dict, text) -> tuple[dict, dict]:
  """Median ms per decode step at batch 1 and 16 ({"b1", "b16"} per name), runs interleaved across all systems
  so load hits all alike: `systems` decode their own samples from random prompts; `forced_systems` decode the
  rows of `text` [16, PROMPT_LEN + new_tokens - 1] teacher-forced (prompt, then one text token per step)."""
  import jax
  import numpy as np
  from pangu import infer

  gen = infer.GenerationConfig(max_new_tokens=new_tokens)
  decode_forced = jax.jit(forced_decode, static_argnums=(0, 1), donate_argnums=3)

  def run(config, params, batch, forced):
    if forced:
      tokens, steps = text[:batch, :PROMPT_LEN], text[:batch, PROMPT_LEN:]
    else:
      tokens = np.random.default_rng(batch).integers(0, config.vocab_size, (batch, PROMPT_LEN)).astype(np.int32)
    state = infer.prefill(config, gen, params, tokens, np.zeros((batch,), np.int32), jax.random.key(0))
    state.last.block_until_ready()
    start = time.perf_counter()
    out = decode_forced(config, gen, params, state, steps) if forced else infer.decode(config, gen, params, state)
    out.tokens.block_until_ready()
    return time.perf_counter() - start

  runs = {(name, False): system for name, system in systems.items()}
  runs.update({(name, True): system for name, system in forced_systems.items()})
  times = {key: {b: [] for b in LATENCY_BATCHES} for key in runs}
  for (name, forced), (config, params) in runs.items():  # compile outside the timed runs
    for batch in LATENCY_BATCHES:
      run(config, params, batch, forced)
  for _ in range(repeats):
    for batch in LATENCY_BATCHES:
      for (name, forced), (config, params) in runs.items():
        times[name, forced][batch].append(run(config, params, batch, forced))
  ms = {key: {f"b{b}": 1e3 * statistics.median(t) / (new_tokens - 1) for b, t in per_batch.items()}
        for key, per_batch in times.items()}
  return ({name: ms[name, False] for name in systems}, {name: ms[name, True] for name in forced_systems})


def transfer_bytes(systems: dict, new_tokens: int, table_format: str) -> dict:
  """name -> bytes moved to the device per generated token at batch 1 and 16.

  MoLE: counted by the disk table's host gather during one decode run. Offloaded MoE: the distinct experts each
  step selects (`distinct_experts_per_step`) times the bytes of one expert in its host dtype.
  """
  import jax
  import numpy as np
  from pangu import infer
  from pangu.infer.offload import expert_bytes
  from pangu.models import mole
  from pangu.nn import lookup_table

  gen = infer.GenerationConfig(max_new_tokens=new_tokens)
  out = {name: {} for name in SYSTEMS}
  for batch in LATENCY_BATCHES:
    rng = np.random.default_rng(batch)
    config, params = systems["mole_disk"]
    prompts = rng.integers(0, config.vocab_size, (batch, PROMPT_LEN)).tolist()
    lookup_table.TRANSFERS.reset()
    outputs = infer.generate(config, params, prompts, gen, jax.random.key(0))
    generated = sum(len(o) for o in outputs)
    # Prefill moves the prompt rows too; per generated token count the decode steps' rows only.
    decode_bytes = (lookup_table.TRANSFERS.bytes[config.mole.table_path]
                    - batch * PROMPT_LEN * mole.row_bytes_per_token(config))
    out["mole_disk"][f"b{batch}"] = out["mole_host"][f"b{batch}"] = decode_bytes / (generated - batch)

    config, params = systems["moe"]
    per_step = distinct_experts_per_step(config, params, prompts, new_tokens)
    out["moe_offload"][f"b{batch}"] = per_step * expert_bytes(config, offload_dtype(table_format)) / batch
    out["dense"][f"b{batch}"] = out["moe"][f"b{batch}"] = 0.0
  return out


def distinct_experts_per_step(config, params, prompts: list, new_tokens: int) -> float:
  """Distinct experts a decode step selects, summed over layers and averaged over steps, from the routing of the
  decoded tokens (the full forward over prompt + output routes every position as the cached decode did)."""
  import jax
  import numpy as np
  from pangu import infer, models

  gen = infer.GenerationConfig(max_new_tokens=new_tokens)
  outputs = infer.generate(config, params, prompts, gen, jax.random.key(0))
  sequences = np.asarray([p + o.tolist() for p, o in zip(prompts, outputs)], np.int32)
  loaded = 0
  for ids in models.routed_expert_ids(config, params, sequences).values():
    ids = np.asarray(ids)[:, len(prompts[0]):-1]  # the inputs of the decode steps
    loaded += sum(len(np.unique(ids[:, t])) for t in range(ids.shape[1]))
  return loaded / ids.shape[1]


def describe_systems(systems: dict, transfer: dict, table_format: str, new_tokens: int, link_gb_per_s: float
                     ) -> dict:
  """name -> dtype of the weights it keeps off the device (dense / moe: the params'), matmul FLOPs per decoded
  token at the mean decode context, and the modelled ms per decode step to move its bytes over the link."""
  from pangu import models

  dtypes = {"moe_offload": offload_dtype(table_format), "mole_host": table_format, "mole_disk": table_format}
  context = PROMPT_LEN + new_tokens // 2
  return {name: {"dtype": dtypes.get(name, config.param_dtype),
                 "flops_per_token": models.forward_matmul_flops_per_token(config, context),
                 "transfer_ms_modelled": {f"b{b}": 1e3 * transfer[name][f"b{b}"] * b / (link_gb_per_s * 1e9)
                                          for b in LATENCY_BATCHES}}
          for name, (config, _) in systems.items()}


def routing_of_trained_and_random(config, trained: dict, prompts: list, new_tokens: int) -> dict:
  """Distinct experts per decode step (batch 16, summed over layers) of a trained MoE and of the same model at
  its random initialisation: the one way the weights change the offloaded baseline's latency."""
  import jax
  from pangu import infer, models

  out = {}
  for name, params in (("trained", trained), ("random", models.init_params(config, jax.random.key(0)))):
    out[name] = distinct_experts_per_step(*infer.decode_layout(config, params), prompts, new_tokens)
  out["num_experts"], out["top_k"], out["layers"] = config.moe.num_experts, config.moe.top_k, config.n_layers
  return out


def cache_rows(fractions: list[float], vocab: int) -> list[int]:
  """Cache sizes in rows for vocabulary fractions, no cache and the claim's fraction always among them."""
  return sorted({round(f * vocab) for f in (0, *fractions, CLAIM_FRACTION)})


def hot_row_systems(mole_host: tuple, token_counts, rows: list[int]) -> dict:
  """rows -> (config, params): the host-table MoLE with a device cache of that many rows (0: none)."""
  from pangu.models import mole

  return {n: mole.cache_hot_rows(*mole_host, token_counts, n) if n else mole_host for n in rows}


def cache_traffic(stored: dict, token_counts, n_rows: int, val_batches: list) -> dict:
  """Lookups of the validation text through a cache of n_rows rows (pangu.nn.hot_rows.lookup), one decode step
  per call: {"hit_rate", "host_bytes_per_token": {"b1", "b16"}} (misses copied in the lookup's buckets)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pangu.nn import hot_rows

  cache = hot_rows.build_cache(stored, token_counts, n_rows)
  table = {name: jnp.asarray(a) for name, a in stored.items()}

  @jax.jit
  def counts(cache, table, steps):
    gather = lambda ids: {name: jnp.take(a, ids, axis=0) for name, a in table.items()}
    return jax.lax.map(lambda tokens: hot_rows.lookup(cache, tokens, gather)[1], steps)

  text = np.concatenate([np.asarray(b["inputs"], np.int32).T for b in val_batches])  # [positions, rows]
  out = {"host_bytes_per_token": {}}
  for batch in LATENCY_BATCHES:
    steps = text[:, :batch] if batch > 1 else text.reshape(-1, 1)
    per_step = {k: np.asarray(v, np.int64) for k, v in counts(cache, table, steps).items()}
    out["host_bytes_per_token"][f"b{batch}"] = float(per_step["moved_rows"].sum() * hot_rows.row_bytes(cache)
                                                     / steps.size)
    if batch == 1:
      out["hit_rate"], out["lookups"] = float(per_step["hit_rows"].sum() / steps.size), int(steps.size)
  return out


def hot_row_section(rows: list[int], systems: dict, latency: dict, stored: dict, token_counts, val_batches: list,
                    link_gb_per_s: float) -> dict:
  """The hot_row_cache payload: per cache size its hit rate, device bytes, bytes crossing per token, the
  modelled link time and the measured latency, beside dense decoding the same text."""
  vocab = len(token_counts)
  per_size = []
  for n in rows:
    traffic = cache_traffic(stored, token_counts, n, val_batches)
    link = {f"b{b}": 1e3 * traffic["host_bytes_per_token"][f"b{b}"] * b / (link_gb_per_s * 1e9)
            for b in LATENCY_BATCHES}
    lat = latency[f"mole_hot_{n}"]
    per_size.append({"fraction": n / vocab, "rows": n, "hit_rate": traffic["hit_rate"],
                     "device_bytes": device_bytes(systems[n][1]),
                     "host_bytes_per_token": traffic["host_bytes_per_token"], "latency_ms": lat,
                     "transfer_ms_modelled": link,
                     "measured_over_dense_b16": lat["b16"] / latency["dense"]["b16"],
                     "modelled_over_dense_b16": (lat["b16"] + link["b16"]) / latency["dense"]["b16"]})
  return {"label": "ours, beyond the paper", "per_size": per_size, "vocab": vocab, "dense_latency_ms": latency["dense"],
          "link_gb_per_s": link_gb_per_s, "lookups": traffic["lookups"],
          "token_counts_from": f"training split ({int(sum(token_counts))} tokens)",
          "hit_rate_on": "validation split, one lookup per token; host bytes per decode step of 1 or 16 rows",
          "protocol": "teacher-forced decoding of validation text, interleaved with the other systems",
          "claim": {"fraction": CLAIM_FRACTION, "hit_rate": CLAIM_HIT_RATE}}


def claim_size(hot: dict) -> dict:
  """The per-size entry of the claim's cache fraction."""
  return next(s for s in hot["per_size"] if s["rows"] == round(CLAIM_FRACTION * hot["vocab"]))


def plot(latency: dict, device: dict, val_loss: dict, hot: dict) -> None:
  fig, axes = common.new_figure(ncols=3, size=(5, 3.8))
  for name in SYSTEMS:
    axes[0, 0].scatter([device[name] / 2**20] * 2, [latency[name]["b1"], latency[name]["b16"]],
                       marker="o", label=name)
    axes[0, 0].annotate(name, (device[name] / 2**20, latency[name]["b16"]), fontsize=7)
  axes[0, 0].set(xscale="log", yscale="log", xlabel="device-resident MiB", ylabel="ms per decode step (b1, b16)",
                 title="decode latency vs device memory")
  axes[0, 0].legend(fontsize=7)
  names = list(val_loss)
  axes[0, 1].bar(range(len(names)), [val_loss[n] for n in names])
  axes[0, 1].set_xticks(range(len(names)), names, rotation=30, fontsize=8)
  axes[0, 1].set(ylabel="validation loss (nats / byte)", ylim=(min(val_loss.values()) - 0.1,
                                                              max(val_loss.values()) + 0.05), title="quality")
  sizes = hot["per_size"]
  fractions = [s["fraction"] for s in sizes]
  axes[0, 2].plot(fractions, [s["hit_rate"] for s in sizes], "o-", color="C0", label="hit rate (validation)")
  axes[0, 2].set(xlabel="cached fraction of the vocabulary rows", ylabel="hit rate", ylim=(0, 1.02),
                 title="hot-row cache (ours)")
  twin = axes[0, 2].twinx()
  twin.plot(fractions, [s["latency_ms"]["b16"] for s in sizes], "s--", color="C1", label="b16 ms measured")
  twin.plot(fractions, [s["latency_ms"]["b16"] + s["transfer_ms_modelled"]["b16"] for s in sizes], "^:",
            color="C2", label="b16 ms + modelled link")
  twin.axhline(hot["dense_latency_ms"]["b16"], color="gray", lw=0.8, label="dense b16")
  twin.set(ylabel="ms per decode step", ylim=(0, None))
  twin.legend(fontsize=7, loc="center right")
  axes[0, 2].legend(fontsize=7, loc="lower right")
  common.save_figure(fig, "mole")


def claims(payload: dict) -> list[dict]:
  """MoLE's claims, judged on this payload."""
  goals, val = payload["goals"], payload["val_loss"]
  best_mole = min(v for k, v in val.items() if k.startswith("mole"))
  others = {k: v for k, v in val.items() if not k.startswith("mole")}
  ratio = lambda key, limit, loose: ("reproduced" if goals[key] <= limit else
                                     "partly" if goals[key] <= loose else "not reproduced")
  return [
      common.claim("MoLE", "The lookup table reproduces the trained experts", "exact re-parameterisation",
                   f"max abs logit error {payload['lut_max_abs_err']:.1e} (float32 table)",
                   "reproduced" if payload["lut_max_abs_err"] < 1e-4 else "not reproduced"),
      common.claim("MoLE", "MoLE beats dense and MoE at equal trainable parameters", "160M: lower loss",
                   f"val loss MoLE {best_mole:.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in others.items()),
                   "reproduced" if best_mole < min(others.values()) else
                   "partly" if best_mole <= max(others.values()) else "not reproduced"),
      common.claim("MoLE", "Decoding with the table off the device is about as fast as dense",
                   "latency ~ dense (goal <= 1.2x)", f"{goals['mole_over_dense_b16']:.2f}x dense at batch 16"
                   + (" (CPU: host and device share memory, no link crossed)" if payload["setup"]["backend"] == "cpu"
                      else ""),
                   ratio("mole_over_dense_b16", 1.2, 1.5)),
      common.claim("MoLE", "and far faster than offloaded MoE", "goal <= 0.2x",
                   f"{goals['mole_over_moe_offload_b16']:.3f}x offloaded MoE at batch 16, measured (experts in the "
                   f"table's dtype, each on its own rows); {goals['modelled_mole_over_moe_offload_b16']:.3f}x "
                   f"modelled with a {payload['link_gb_per_s']:g} GB/s host link",
                   ratio("mole_over_moe_offload_b16", 0.2, 0.5)),
      *hot_row_claims(payload["hot_row_cache"]),
  ]


def hot_row_claims(hot: dict) -> list[dict]:
  """Our claims for the hot-row cache (beyond the paper), judged at the fraction fixed before the runs."""
  size, none = claim_size(hot), hot["per_size"][0]  # sizes ascend from no cache (`cache_rows`)
  share = f"{size['rows']} of {hot['vocab']} rows"
  return [
      common.claim("MoLE (ours, beyond the paper)",
                   f"A device cache of {CLAIM_FRACTION:.1%} of the table rows serves >= {CLAIM_HIT_RATE:.0%} of "
                   "lookups", f"hit rate >= {CLAIM_HIT_RATE:.0%}",
                   f"{size['hit_rate']:.1%} of validation lookups hit a cache of {share}",
                   "reproduced" if size["hit_rate"] >= CLAIM_HIT_RATE else
                   "partly" if size["hit_rate"] >= 0.75 else "not reproduced"),
      common.claim("MoLE (ours, beyond the paper)",
                   "With that cache and the rest of the table on host, decoding is about as fast as dense",
                   "goal <= 1.2x dense at batch 16",
                   f"{size['modelled_over_dense_b16']:.2f}x modelled (measured step + "
                   f"{size['host_bytes_per_token']['b16']:.0f} B/token over a {hot['link_gb_per_s']:g} GB/s link), "
                   f"{size['measured_over_dense_b16']:.2f}x measured here; without the cache "
                   f"{none['modelled_over_dense_b16']:.2f}x modelled, {none['host_bytes_per_token']['b16']:.0f} "
                   "B/token",
                   "reproduced" if size["modelled_over_dense_b16"] <= 1.2 else
                   "partly" if size["modelled_over_dense_b16"] <= 1.5 else "not reproduced"),
  ]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax
  import numpy as np
  from pangu import data
  from pangu.models import mole
  quick = common.QUICK.value

  steps, width, layers = common.pick(_STEPS, 400, 40), common.pick(_WIDTH, 96, 48), common.pick(_LAYERS, 6, 4)
  lat_width, lat_layers = common.pick(_LATENCY_WIDTH, 768, 384), common.pick(_LATENCY_LAYERS, 12, 4)
  new_tokens, repeats = common.pick(_NEW_TOKENS, 32, 12), common.pick(_REPEATS, 5, 3)
  fractions = [_fraction(f) for f in common.pick(_CACHE_FRACTIONS, ["0", "1/32", "1/16", "1/8", "1/4", "1/2", "1"],
                                                 ["0", "1/8"])]
  if width % 3 or lat_width % 3:
    raise app.UsageError(f"--width={width} and --latency_width={lat_width} must be multiples of 3")
  vocab = data.ByteTokenizer().vocab_size

  configs = {k: v for k, v in model_configs(width, layers, vocab, HEADS).items() if k != "moe_34e"}
  params, val_loss, val_batches, token_counts = train_models(configs, steps, quick)
  formats = lut_errors(configs, params, val_batches)
  rows = cache_rows(fractions, vocab)
  text = np.asarray(val_batches[0]["inputs"][:max(LATENCY_BATCHES), :PROMPT_LEN + new_tokens - 1], np.int32)
  with tempfile.TemporaryDirectory() as table_dir:
    systems = latency_systems(lat_width, lat_layers, vocab, HEADS, _TABLE_FORMAT.value, table_dir)
    cached = hot_row_systems(systems["mole_host"], token_counts, rows)
    forced = {"dense": systems["dense"], **{f"mole_hot_{n}": system for n, system in cached.items()}}
    latency, forced_latency = measure_latency(systems, new_tokens, repeats, forced, text)
    transfer = transfer_bytes(systems, new_tokens, _TABLE_FORMAT.value)
    device = {name: device_bytes(p) for name, (_, p) in systems.items()}
    system_info = describe_systems(systems, transfer, _TABLE_FORMAT.value, new_tokens, _LINK_GB_PER_S.value)
    hot = hot_row_section(rows, cached, forced_latency, mole.table_arrays(*systems["mole_host"]), token_counts,
                          val_batches, _LINK_GB_PER_S.value)
  prompts = val_batches[0]["inputs"][:max(LATENCY_BATCHES), :PROMPT_LEN].tolist()  # validation text
  routing = routing_of_trained_and_random(configs["moe_10e"], params["moe_10e"], prompts, new_tokens)

  mole_b16 = min(latency["mole_host"]["b16"], latency["mole_disk"]["b16"])
  # Modelled for an accelerator: each system's step measured here (where its host copy is a local memory copy)
  # plus its bytes over the link at the stated bandwidth.
  modelled = lambda name: latency[name]["b16"] + system_info[name]["transfer_ms_modelled"]["b16"]
  goals = {"mole_over_dense_b16": mole_b16 / latency["dense"]["b16"],
           "mole_over_moe_offload_b16": mole_b16 / latency["moe_offload"]["b16"],
           "modelled_mole_over_moe_offload_b16": modelled("mole_host") / modelled("moe_offload"),
           "targets": {"mole_over_dense_b16": 1.2, "mole_over_moe_offload_b16": 0.2}}
  payload = {
      "val_loss": val_loss,
      "lut_max_abs_err": max(formats[m]["float32"]["max_abs_err"] for m in formats),
      "lut_formats": formats,
      "decode_ms_per_token": latency,
      "device_bytes": device,
      "per_token_transfer_bytes": transfer,
      "systems": system_info,
      "link_gb_per_s": _LINK_GB_PER_S.value,
      "distinct_experts_per_step": routing,
      "hot_row_cache": hot,
      "goals": goals,
      "setup": {"steps": steps, "width": width, "layers": layers, "heads": HEADS, "seq_len": SEQ_LEN,
                "batch": BATCH, "vocab": vocab, "latency_width": lat_width, "latency_layers": lat_layers,
                "prompt_len": PROMPT_LEN, "latency_table_format": _TABLE_FORMAT.value, "new_tokens": new_tokens,
                "repeats": repeats,
                "moe_baseline": "top-2 of 10 (quality) / 34 (latency) SwiGLU experts of width 4D/3, no shared "
                                "expert, balance loss 1e-2",
                "latency_pairs": {"moe": "moe_34e", "mole": "mole_16e"},
                "params": {name: sum(x.size for x in jax.tree.leaves(p)) for name, p in params.items()},
                "latency_unit": "ms per decode step (one token per row)", "quick": quick,
                **common.machine_info()},
  }
  payload["claims"] = claims(payload)
  common.write_json("mole", payload)
  plot(latency, device, val_loss, hot)
  rows = [{"system": s, "dtype": system_info[s]["dtype"], "b1_ms": latency[s]["b1"], "b16_ms": latency[s]["b16"],
           "device_MiB": device[s] / 2**20, "bytes_per_token_b16": transfer[s]["b16"],
           "link_ms_b16_modelled": system_info[s]["transfer_ms_modelled"]["b16"],
           "MFLOP_per_token": system_info[s]["flops_per_token"] / 1e6} for s in SYSTEMS]
  loss_rows = [{"model": n, "val_loss": v, "params": payload["setup"]["params"][n]} for n, v in val_loss.items()]
  hot_rows = [{"fraction": s["fraction"], "rows": s["rows"], "hit_rate": s["hit_rate"],
               "device_MiB": s["device_bytes"] / 2**20, "host_B_per_token_b16": s["host_bytes_per_token"]["b16"],
               "b1_ms": s["latency_ms"]["b1"], "b16_ms": s["latency_ms"]["b16"],
               "link_ms_b16_modelled": s["transfer_ms_modelled"]["b16"],
               "modelled_over_dense_b16": s["modelled_over_dense_b16"]} for s in hot["per_size"]]
  common.write_table("mole", "\n\n".join([
      f"Validation loss after {steps} steps (D={width}, L={layers}):",
      common.format_table(loss_rows, ["model", "val_loss", "params"]),
      f"Lookup vs training logits, max abs error (float32 table): {payload['lut_max_abs_err']:.2e}",
      f"Decode latency (D={lat_width}, L={lat_layers}, random weights, ms per step):",
      common.format_table(rows, ["system", "dtype", "b1_ms", "b16_ms", "device_MiB", "bytes_per_token_b16",
                                 "link_ms_b16_modelled", "MFLOP_per_token"]),
      f"MoLE / dense at b16: {goals['mole_over_dense_b16']:.2f} (goal <= 1.2); MoLE / offloaded MoE at b16: "
      f"{goals['mole_over_moe_offload_b16']:.3f} measured, {goals['modelled_mole_over_moe_offload_b16']:.3f} "
      f"modelled at {_LINK_GB_PER_S.value:g} GB/s (goal <= 0.2)",
      f"Distinct experts per decode step at b16 (MoE-10E, summed over {routing['layers']} layers): trained "
      f"{routing['trained']:.1f}, random init {routing['random']:.1f}",
      f"Hot-row cache (ours, beyond the paper): MoLE table on host, the most frequent tokens' rows on device; "
      f"validation text decoded teacher-forced; dense on the same text: {hot['dense_latency_ms']['b1']:.2f} / "
      f"{hot['dense_latency_ms']['b16']:.2f} ms (b1 / b16):",
      common.format_table(hot_rows, ["fraction", "rows", "hit_rate", "device_MiB", "host_B_per_token_b16", "b1_ms",
                                     "b16_ms", "link_ms_b16_modelled", "modelled_over_dense_b16"])]))


def _fraction(text: str) -> float:
  """'1/8' or '0.125' -> 0.125, in [0, 1]."""
  try:
    num, _, den = text.partition("/")
    value = float(num) / float(den or 1)
  except (ValueError, ZeroDivisionError) as e:
    raise app.UsageError(f"--cache_fractions: {text!r} is not a fraction") from e
  if not 0 <= value <= 1:
    raise app.UsageError(f"--cache_fractions: {text!r} is outside [0, 1]")
  return value


if __name__ == "__main__":
  app.run(main)
