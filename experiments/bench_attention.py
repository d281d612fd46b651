"""The Pallas flash attention kernels against the XLA reference and cuDNN: agreement, time, TFLOP/s.

  python -m experiments.bench_attention [--quick] [--results_dir=results]

The same command runs anywhere. On a GPU it times, for causal bfloat16 attention (MHA, 16k tokens per batch,
hidden 2048), the Pallas kernel (`pangu_kernels.flash_attention(implementation="pallas")`), the plain-XLA reference
(float32 softmax over the materialised [B, H, S, S] scores) and `jax.nn.dot_product_attention(implementation=
"cudnn")`, forward and forward + backward, for sequences of 1k-16k and head dims 64 and 128, with the achieved
TFLOP/s and its fraction of a measured bfloat16 matmul peak; then the goal check at 8k (kernel forward >= 0.7x
cuDNN's speed and >= 2x the reference's). On CPU the kernels only run interpreted, which is no speed measure: only
the reference is timed there, at small sizes. Everywhere, the kernels are first checked against the reference
(forward and gradients, several masks, and the decode kernel).

Writes <results_dir>/bench_attention.json ({"backend", "kernel_timed", "note", "matmul_peak_tflops",
"agreement": [...], "cases": [{"seq", "head_dim", "batch", "heads", "mode", "implementation", "ms", "tflops",
"fraction_of_peak"}], "goal": {...}}), bench_attention.png and bench_attention.md.
"""

import functools

from absl import app, flags

from experiments import common

_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per case on an accelerator (median reported).",
                                lower_bound=1)

TOKENS = {"gpu": 16384, "cpu": 1024}  # per batch: batch = tokens // seq
HIDDEN = {"gpu": 2048, "cpu": 256}  # heads = hidden // head_dim
SEQS = {("gpu", False): (1024, 2048, 4096, 8192, 16384), ("gpu", True): (2048, 8192),
        ("cpu", False): (256, 512, 1024), ("cpu", True): (256, 512)}
HEAD_DIMS = {("gpu", False): (64, 128), ("gpu", True): (64, 128), ("cpu", False): (64, 128), ("cpu", True): (64,)}
GOAL_SEQ, GOAL_VS_CUDNN, GOAL_VS_XLA = 8192, 0.7, 2.0
MODES = ("forward", "forward+backward")
# FlashAttention-2's count: the backward does 2.5x the forward's matmul work.
_MODE_FLOPS = {"forward": 1.0, "forward+backward": 3.5}


def _matmul_peak_tflops(repeats: int) -> float:
  """The bfloat16 matmul throughput XLA reaches here: the ceiling the attention numbers are read against."""
  import jax
  import jax.numpy as jnp
  n = 8192 if jax.default_backend() == "gpu" else 1024
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  matmul = jax.jit(lambda a: a @ a)
  return 2 * n ** 3 / common.median_ms(lambda: matmul(a), repeats) / 1e9


def _attention_fns(backend: str):
  """implementation -> attention(q, k, v) for causal attention; the kernel only where it compiles."""
  import jax
  import pangu_kernels
  fns = {"xla": functools.partial(pangu_kernels.flash_attention, implementation="xla")}
  if backend == "gpu":
    fns["pallas"] = functools.partial(pangu_kernels.flash_attention, implementation="pallas")
    fns["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  return fns


def _with_backward(attend):
  import jax
  def run(q, k, v, cotangent):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(cotangent)
  return run


def _max_errors(got, want) -> list[float]:
  import jax
  import jax.numpy as jnp
  return [float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want))]


def _agreement(backend: str) -> list[dict]:
  """Max |kernel - reference| of out, dq, dk, dv under several masks, and of the decode kernel's out: float32, head
  dim 64, lengths that end in partial blocks; compiled on GPU (a failure is recorded, not raised: this is the
  first place a new GPU compiles them), interpreted elsewhere at a smaller size."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import pangu_kernels
  kernel = "pallas" if backend == "gpu" else "pallas_interpret"
  b, s, h, kv_heads, dh = (2, 1000, 8, 2, 64) if backend == "gpu" else (2, 72, 4, 2, 64)
  rng = np.random.default_rng(0)
  q, cotangent = (jnp.asarray(rng.normal(size=(b, s, h, dh)), jnp.float32) for _ in "qc")
  k, v = (jnp.asarray(rng.normal(size=(b, s, kv_heads, dh)), jnp.float32) for _ in "kv")
  left_padded = jnp.asarray(np.stack([np.arange(s) - s // 3, np.arange(s)]), jnp.int32)
  lengths = jnp.array([s, s // 2], jnp.int32)
  flash_masks = {
      "causal": {}, "full": dict(causal=False),
      "segments_window_softcap": dict(segment_ids=jnp.asarray(np.arange(s)[None].repeat(b, 0) * 3 // s),
                                      window=s // 4, logit_softcap=30.0),
      "left_padding_ragged": dict(q_positions=left_padded, kv_positions=left_padded, kv_lengths=lengths - 7)}

  def flash(implementation, **kwargs):
    attend = functools.partial(pangu_kernels.flash_attention, implementation=implementation, **kwargs)
    return jax.jit(_with_backward(attend))(q, k, v, cotangent)

  def decode(implementation):
    return pangu_kernels.decode_attention(q[:, :2], k.swapaxes(1, 2), v.swapaxes(1, 2), kv_lengths=lengths,
                                          q_positions=jnp.stack([lengths - 2, lengths - 1], 1), num_splits=4,
                                          implementation=implementation)

  runs = {("flash_attention", name): functools.partial(flash, **kwargs) for name, kwargs in flash_masks.items()}
  runs["decode_attention", "ragged_lengths_4_splits"] = decode
  rows = []
  with jax.default_matmul_precision("highest"):
    for (kernel_name, mask), run in runs.items():
      row = {"kernel": kernel_name, "mask": mask}
      try:
        row.update(zip(("out", "dq", "dk", "dv"), _max_errors(run(kernel), run("xla"))))
      except Exception as error:  # reported in the results
        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
      rows.append(row)
  return rows


def _time_cases(backend: str, quick: bool, repeats: int, peak: float) -> list[dict]:
  import jax
  import jax.numpy as jnp
  cases = []
  fns = _attention_fns(backend)
  for head_dim in HEAD_DIMS[backend, quick]:
    for seq in SEQS[backend, quick]:
      batch, heads = TOKENS[backend] // seq, HIDDEN[backend] // head_dim
      keys = jax.random.split(jax.random.key(seq + head_dim), 4)
      q, k, v, cotangent = (jax.random.normal(key, (batch, seq, heads, head_dim), jnp.bfloat16) for key in keys)
      forward_flops = 4 * batch * heads * seq * seq * head_dim / 2  # causal: half the scores
      for implementation, attend in fns.items():
        runs = {"forward": jax.jit(attend), "forward+backward": jax.jit(_with_backward(attend))}
        args = {"forward": (q, k, v), "forward+backward": (q, k, v, cotangent)}
        for mode in MODES:
          case = {"seq": seq, "head_dim": head_dim, "batch": batch, "heads": heads, "mode": mode,
                  "implementation": implementation}
          try:
            ms = common.median_ms(functools.partial(runs[mode], *args[mode]), repeats)
          except Exception as error:  # e.g. the reference's [B, H, S, S] scores outgrow the memory
            cases.append({**case, "ms": None, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            continue
          tflops = _MODE_FLOPS[mode] * forward_flops / ms / 1e9
          cases.append({**case, "ms": ms, "tflops": tflops, "fraction_of_peak": tflops / peak})
  return cases


def _goal(cases: list[dict], backend: str) -> dict:
  """At GOAL_SEQ, per head dim: the kernel's forward speed relative to cuDNN's and to the reference's."""
  if backend != "gpu":
    return {"checked": False, "reason": f"the kernel is timed only where it compiles (GPU), not on {backend}"}
  forward = {(c["head_dim"], c["implementation"]): c["ms"] for c in cases
             if c["seq"] == GOAL_SEQ and c["mode"] == "forward"}
  per_head_dim = []
  for head_dim in sorted({hd for hd, _ in forward}):
    kernel, cudnn, xla = (forward.get((head_dim, impl)) for impl in ("pallas", "cudnn", "xla"))
    vs_cudnn = cudnn / kernel if kernel and cudnn else None
    vs_xla = xla / kernel if kernel and xla else None  # a reference that ran out of memory counts as beaten
    per_head_dim.append({"head_dim": head_dim, "speed_vs_cudnn": vs_cudnn, "speed_vs_xla": vs_xla,
                         "met": bool(kernel) and vs_cudnn is not None and vs_cudnn >= GOAL_VS_CUDNN
                         and (xla is None or vs_xla >= GOAL_VS_XLA)})
  return {"checked": True, "seq": GOAL_SEQ, "target_vs_cudnn": GOAL_VS_CUDNN, "target_vs_xla": GOAL_VS_XLA,
          "per_head_dim": per_head_dim, "met": bool(per_head_dim) and all(r["met"] for r in per_head_dim)}


def _plot(cases: list[dict], backend: str) -> None:
  fig, axes = common.new_figure(ncols=len(MODES))
  for ax, mode in zip(axes[0], MODES):
    for implementation in sorted({c["implementation"] for c in cases}):
      for head_dim, style in zip(sorted({c["head_dim"] for c in cases}), ("-o", "--s")):
        points = [(c["seq"], c["tflops"]) for c in cases if c["mode"] == mode and c.get("tflops")
                  and c["implementation"] == implementation and c["head_dim"] == head_dim]
        if points:
          ax.plot(*zip(*points), style, label=f"{implementation} Dh={head_dim}")
    ax.set(xscale="log", xlabel="sequence length", ylabel="TFLOP/s", title=f"causal attention {mode} ({backend})")
    ax.legend(fontsize=7)
  common.save_figure(fig, "bench_attention")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax
  backend = "gpu" if jax.default_backend() == "gpu" else "cpu"
  quick = common.QUICK.value
  repeats = _REPEATS.value if backend == "gpu" else 3
  agreement = _agreement(backend)
  peak = _matmul_peak_tflops(repeats)
  cases = _time_cases(backend, quick, repeats, peak)
  kernel_timed = backend == "gpu"
  note = ("compiled Pallas kernel timed against the XLA reference and cuDNN" if kernel_timed else
          "the Pallas kernels run only interpreted here, which is not a speed measure: they are checked for "
          "agreement only, and only the XLA reference is timed")
  common.write_json("bench_attention", {
      "backend": jax.default_backend(), "device": str(jax.devices()[0]), "kernel_timed": kernel_timed, "note": note,
      "matmul_peak_tflops": peak, "agreement": agreement, "cases": cases, "goal": _goal(cases, backend),
      "machine": common.machine_info()})
  _plot(cases, backend)
  common.write_table("bench_attention", "\n\n".join([
      common.format_table(agreement, ["kernel", "mask", "out", "dq", "dk", "dv", "error"]),
      common.format_table(cases, ["seq", "head_dim", "batch", "heads", "mode", "implementation", "ms", "tflops",
                                  "fraction_of_peak"])]))


if __name__ == "__main__":
  app.run(main)
