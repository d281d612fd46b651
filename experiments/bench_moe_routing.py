"""The fused Pallas MoGE routing kernel against its plain-XLA reference, timed side by side on this backend.

  python -m experiments.bench_moe_routing [--quick]

On GPU/TPU the kernel is compiled; on CPU it runs interpreted, so only the agreement is meaningful there.
Writes results/bench_moe_routing.json: {"backend", "cases": [{"tokens", "experts", "groups", "k_per_group",
"pallas_ms", "xla_ms", "speedup", "ids_match", "order_match", "max_weight_err"}]} and a plot.
"""


from absl import app, flags

from experiments import common

_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per case (median reported).", lower_bound=1)

# (tokens, experts, groups, k per group): Pangu Pro MoE routes 64 experts in 8 groups, 1 per group.
FULL_CASES = ((4096, 64, 8, 1), (16384, 64, 8, 1), (65536, 64, 8, 1), (16384, 64, 8, 2), (16384, 128, 8, 2))
QUICK_CASES = ((1000, 64, 8, 1), (256, 32, 4, 2))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax
  import numpy as np

  from pangu_kernels.moe_routing import moge_routing

  cases = []
  for tokens, experts, groups, k in (QUICK_CASES if common.QUICK.value else FULL_CASES):
    logits = jax.random.normal(jax.random.key(tokens + experts), (tokens, experts), jax.numpy.float32)
    run = {impl: (lambda impl=impl: moge_routing(logits, num_groups=groups, k_per_group=k, implementation=impl))
           for impl in ("pallas", "xla")}
    got, want = run["pallas"](), run["xla"]()
    repeats = 1 if jax.default_backend() == "cpu" else _REPEATS.value
    pallas_ms, xla_ms = common.median_ms(run["pallas"], repeats), common.median_ms(run["xla"], repeats)
    cases.append({
        "tokens": tokens, "experts": experts, "groups": groups, "k_per_group": k,
        "pallas_ms": pallas_ms, "xla_ms": xla_ms, "speedup": xla_ms / pallas_ms,
        "ids_match": bool(np.array_equal(got.expert_ids, want.expert_ids)),
        "order_match": bool(np.array_equal(got.sort_order, want.sort_order)
                            and np.array_equal(got.group_sizes, want.group_sizes)),
        "max_weight_err": float(np.max(np.abs(np.asarray(got.weights) - np.asarray(want.weights)))),
    })
  common.write_json("bench_moe_routing", {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
                                          "interpreted": jax.default_backend() == "cpu", "cases": cases,
                                          "machine": common.machine_info()})
  fig, axes = common.new_figure()
  labels = [f"T={c['tokens']}\nN={c['experts']} K'={c['k_per_group']}" for c in cases]
  x = np.arange(len(cases))
  axes[0, 0].bar(x - 0.2, [c["xla_ms"] for c in cases], 0.4, label="XLA reference")
  axes[0, 0].bar(x + 0.2, [c["pallas_ms"] for c in cases], 0.4, label="Pallas kernel")
  axes[0, 0].set_xticks(x, labels, fontsize=7)
  axes[0, 0].set(ylabel="ms per call", title=f"MoGE routing on {jax.default_backend()}")
  axes[0, 0].legend()
  common.save_figure(fig, "bench_moe_routing")
  common.write_table("bench_moe_routing", common.format_table(
      cases, ["tokens", "experts", "k_per_group", "pallas_ms", "xla_ms", "speedup", "ids_match", "order_match",
              "max_weight_err"]))


if __name__ == "__main__":
  app.run(main)
