"""MoE layer forward + backward throughput: top-K vs MoGE on 1 and 8 CPU devices.

  python -m experiments.bench_moe_layer --quick

One `MoEFeedForward` of Pangu Pro MoE's routing shape (N = 64 experts, K = 8; MoGE: M = 8 groups, K' = 1) at a
small width. On 8 devices the experts are split over the mesh's `expert` axis (8 per device, one MoGE group
each): MoGE exchanges tokens with the fixed-size all-to-all, top-K with the dropless ring (all_gather +
psum_scatter) and, as `topk_capacity`, with the capacity-padded all-to-all (capacity factor 1.25). One device
runs the same layer without expert parallelism. Every variant is compiled first, then the timed steps run
round-robin so that machine drift hits all of them alike; the step time is the median.

Writes results/bench_moe_layer.json: {"setup": {...}, "results": {variant: {"1": {"step_time_s", "tokens_per_s",
"max_over_mean_device_load", "dropped"}, "8": {...}}}, "moge_not_slower_on_8_devices": bool},
bench_moe_layer.png and the table as bench_moe_layer.md.
"""

import statistics

from absl import app, flags

from experiments import common

_TOKENS = flags.DEFINE_integer("tokens", None, "Tokens per step (default 8192, --quick 2048).", lower_bound=1)
_D_MODEL = flags.DEFINE_integer("d_model", None, "Model width D (default 256, --quick 128).", lower_bound=1)
_EXPERT_DIM = flags.DEFINE_integer("expert_dim", None, "Expert width F (default 128, --quick 64).", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed steps per variant (default 10, --quick 5).", lower_bound=1)

VARIANTS = {
    "topk": dict(router="topk"),
    "moge": dict(router="moge"),
    "topk_capacity": dict(router="topk", dispatch="capacity"),
}
DEVICE_COUNTS = (1, 8)
SEQ_LEN = 256


def build_step(variant: str, num_devices: int, tokens: int, d_model: int, expert_dim: int):
  """A jitted forward + backward of one MoE layer on `num_devices` devices, with its placed inputs."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from pangu.nn import moe
  from pangu.parallel import cpu_mesh, rules, single_device_mesh

  config = moe.MoEConfig(num_experts=64, top_k=8, expert_dim=expert_dim, num_groups=8, **VARIANTS[variant])
  layer = moe.MoEFeedForward(config, d_model=d_model)
  mesh = (cpu_mesh(expert=num_devices) if num_devices > 1
          else single_device_mesh())
  x = jax.random.normal(jax.random.key(1), (tokens // SEQ_LEN, SEQ_LEN, d_model), jnp.float32)
  boxed = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
  params = jax.jit(lambda k: nn.unbox(layer.init(k, x)["params"]),
                   out_shardings=rules.param_shardings(boxed, mesh))(jax.random.key(0))
  x = jax.device_put(x, rules.activation_sharding(mesh, (rules.BATCH, rules.LENGTH, rules.ACT_EMBED)))

  def loss(params, x):
    y, state = layer.apply({"params": params}, x, mutable=[moe.MOE_COLLECTION])
    return jnp.mean(jnp.square(y)), moe.moe_metrics(state[moe.MOE_COLLECTION])

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  def step():
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules.DEFAULT_RULES):
      return jax.block_until_ready(grad_fn(params, x))

  return step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quick = common.QUICK.value
  tokens = common.pick(_TOKENS, 8192, 2048)
  d_model = common.pick(_D_MODEL, 256, 128)
  expert_dim = common.pick(_EXPERT_DIM, 128, 64)
  repeats = common.pick(_REPEATS, 10, 5)
  if tokens % (SEQ_LEN * 8):
    raise app.UsageError(f"--tokens={tokens} must be a multiple of {SEQ_LEN * 8} (sequences split over 8 devices)")

  steps, metrics = {}, {}
  for variant in VARIANTS:
    for devices in DEVICE_COUNTS:
      step = build_step(variant, devices, tokens, d_model, expert_dim)
      (_, layer_metrics), _ = step()  # compile and warm up
      steps[variant, devices] = step
      metrics[variant, devices] = layer_metrics
  times = common.interleaved_seconds(steps, repeats)

  results = {variant: {} for variant in VARIANTS}
  for (variant, devices), samples in times.items():
    median = statistics.median(samples)
    m = metrics[variant, devices]
    results[variant][str(devices)] = {
        "step_time_s": median, "tokens_per_s": tokens / median,
        "max_over_mean_device_load": float(m["max_over_mean_device_load"]), "dropped": int(m["dropped"]),
        "step_times_s": samples,
    }
  moge_8 = results["moge"]["8"]["step_time_s"]
  payload = {
      "setup": {"tokens": tokens, "d_model": d_model, "expert_dim": expert_dim, "num_experts": 64, "top_k": 8,
                "num_groups": 8, "capacity_factor": 1.25, "repeats": repeats, "quick": quick,
                "exchanges_on_8": {"moge": "fixed all_to_all", "topk": "ring (all_gather + psum_scatter)",
                                   "topk_capacity": "capacity-padded all_to_all"},
                **common.machine_info()},
      "results": results,
      "moge_not_slower_on_8_devices": bool(moge_8 <= min(results[v]["8"]["step_time_s"] for v in ("topk",
                                                                                                 "topk_capacity"))),
  }
  common.write_json("bench_moe_layer", payload)

  fig, axes = common.new_figure(size=(6, 3.5))
  width = 0.8 / len(VARIANTS)
  for i, variant in enumerate(VARIANTS):
    axes[0, 0].bar([d + (i - 1) * width for d in range(len(DEVICE_COUNTS))],
                   [results[variant][str(d)]["tokens_per_s"] for d in DEVICE_COUNTS], width, label=variant)
  axes[0, 0].set(xticks=range(len(DEVICE_COUNTS)), xticklabels=[f"{d} device(s)" for d in DEVICE_COUNTS],
                 ylabel="tokens / s (fwd + bwd)", title="MoE layer throughput, N=64, K=8")
  axes[0, 0].legend(fontsize=8)
  common.save_figure(fig, "bench_moe_layer")

  rows = [{"variant": v, "devices": d, **{k: r[k] for k in ("step_time_s", "tokens_per_s",
                                                             "max_over_mean_device_load", "dropped")}}
          for v, per in results.items() for d, r in per.items()]
  common.write_table("bench_moe_layer", "\n\n".join([
      common.format_table(rows, ["variant", "devices", "step_time_s", "tokens_per_s", "max_over_mean_device_load",
                                 "dropped"]),
      f"MoGE step time on 8 devices <= top-K's: {payload['moge_not_slower_on_8_devices']}"]))


if __name__ == "__main__":
  app.run(main)
