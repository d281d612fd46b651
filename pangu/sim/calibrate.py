"""Calibration of the `cpu(8)` topology by microbenchmarks, stored as JSON and loaded as a `Topology`.

The 8 fake CPU devices share the host's cores, memory and caches, so every microbenchmark runs on all 8 at
once (one `shard_map` over a (`node` = 2, `npu` = 4) mesh), as the measured train steps do (Ultra MoE spec §4):

- matmul: chains of R dependent [m, k] @ [k, k] products per device; the slope over R is one product's time
  without the dispatch. A long chain of tiny products gives the static cost per op; the rate is the median
  of FLOPs / (time − static) over the larger sizes.
- vector: a long chain of tiny normalisations (a reduction and a division), slope over R: the static cost
  of a vector op. Copy bandwidth: one large element-wise op (read + write) per device.
- collectives: chains of all_gather, psum_scatter, psum and all_to_all over each mesh axis at several sizes,
  each step's slope minus that of the same chain without the collective (the psum_scatter step re-tiles its
  output, a copy the difference does not remove); α (per step) and β (seconds per byte) of each axis are
  fitted by least squares on relative error to s·α + (n − 1)/n · V · β per phase (two phases for psum), and
  checked on a held-out size.
- operator profiles (the Pangu simulators profile operators, then compose them; Ultra MoE, secondary): one
  library operator per family (`operators.FAMILIES`), chained R times, forward and under `jax.grad`: an
  RMSNorm + SwiGLU block (`dense`), `dot_product_attention` (`attention`) and the blocked dropless
  `routed_experts` (`experts`). Each family's forward scale is the measured time over the roofline model of
  the same ops with the constants above; its backward factor is measured backward / forward.
- optimizer: our AdamW update with its clip and norms (`pangu.train.optim`) on replicated parameters, as a
  data-parallel step runs it; stored as effective HBM bytes per parameter at the copy bandwidth.
- step overhead: a jitted call on a state-sized pytree of tiny sharded arrays (dispatch and host work).

Compile time is excluded (each benchmark is built and warmed first), every call is blocked on, and the
benchmarks run in interleaved rounds (with the measured train steps, when validating) so that the shared
machine's drift hits them alike; fits use medians. Regenerate with
`python -m pangu.sim calibrate --out=pangu/sim/calibration/cpu8.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from pangu.nn.moe.config import MoEConfig
from pangu.parallel.topology import AxisSpec, DeviceSpec, LinkKind, Topology, cpu
from pangu.sim import operators
from pangu.sim.shapes import GQA, ModelShape
from pangu.sim.training import SimOptions

DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "calibration", "cpu8.json")
MESH_AXES = ("node", "npu")
MESH_SHAPE = (2, 4)
COLLECTIVES = ("all_gather", "psum_scatter", "psum", "all_to_all")
PHASES = {"all_gather": 1, "psum_scatter": 1, "psum": 2, "all_to_all": 1}
MATMUL_SIZES = (64, 128, 256, 384)
COLLECTIVE_BYTES = (1 << 17, 1 << 19, 1 << 21, 1 << 23)
HELD_OUT_BYTES = 1 << 21
CHAIN = (1, 9)
PROFILE_CHAIN = (1, 4)
# Per-device reference shapes of the operator profiles.
DENSE_PROFILE = {"tokens": 256, "d": 256, "f": 704}
ATTENTION_PROFILE = {"batch": 2, "seq": 128, "heads": 4, "head_dim": 64}
EXPERTS_PROFILE = {"tokens": 512, "d": 128, "f": 128, "experts": 4, "top_k": 2}
STATIC_CHAIN = (1, 33)  # long chains of tiny ops: the per-op static cost stands out of the noise
TINY = 16
# Leaves of the state-sized pytree for the step overhead: a small decoder's params + two AdamW moments + batch.
OVERHEAD_LEAVES = 64
OPTIMIZER_PARAMS = 1 << 20


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A compiled, warmed-up call: `run()` executes it once and blocks until it is done."""

  name: str
  run: Callable[[], None]


def _benchmark(name: str, fn: Callable, *args) -> Benchmark:
  def run():
    jax.block_until_ready(fn(*args))
  run()  # compile and warm up
  return Benchmark(name, run)


def time_rounds(benchmarks: list[Benchmark], rounds: int, log: Callable[[str], None] = print) -> dict[str, list[float]]:
  """Seconds of every benchmark in each of `rounds` interleaved rounds."""
  times = {b.name: [] for b in benchmarks}
  for index in range(rounds):
    for benchmark in benchmarks:
      start = time.perf_counter()
      benchmark.run()
      times[benchmark.name].append(time.perf_counter() - start)
    log(f"round {index + 1}/{rounds} done")
  return times


def _mesh() -> jax.sharding.Mesh:
  return jax.make_mesh(MESH_SHAPE, MESH_AXES, axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def _per_device(name: str, mesh, body, shape: tuple[int, ...], *replicated: jax.Array) -> Benchmark:
  """`body(x, *replicated)` on a [shape] float32 block per device, in one jitted shard_map; `replicated`
  arrays are arguments (not constants XLA could fold) that every device holds whole."""
  spec = PartitionSpec(MESH_AXES)
  x = jax.device_put(jax.random.normal(jax.random.key(0), (8 * shape[0], *shape[1:]), jnp.float32),
                     NamedSharding(mesh, spec))
  replicated = tuple(jax.device_put(a, NamedSharding(mesh, PartitionSpec())) for a in replicated)
  fn = jax.shard_map(body, mesh=mesh, in_specs=(spec,) + (PartitionSpec(),) * len(replicated), out_specs=spec,
                     check_vma=False)
  return _benchmark(name, jax.jit(fn), x, *replicated)


def _chains(name: str, mesh, make_body: Callable[[int], Callable], shape: tuple[int, ...],
            chain: tuple[int, int] = CHAIN, *replicated: jax.Array) -> list[Benchmark]:
  return [_per_device(f"{name}/{r}", mesh, make_body(r), shape, *replicated) for r in chain]


def _matmul_chain(repeat: int):
  """R dependent products x @ w_i with the stacked weights [R_max, k, k] as an argument."""
  def body(x, ws):
    for i in range(repeat):
      x = x @ ws[i]
    return x
  return body


def _profile_chain(step: Callable, grad: bool):
  """R residual applications of `step(x, params_i)`; under `grad` the gradient w.r.t. x and every params_i."""
  def make(repeat: int):
    def forward(x, params):
      for i in range(repeat):
        x = x + step(x, jax.tree.map(lambda p: p[i], params))
      return x

    def body(x, params):
      if not grad:
        return forward(x, params)
      dx, dparams = jax.grad(lambda x, p: jnp.sum(forward(x, p)), argnums=(0, 1))(x, params)
      return dx + sum(leaf.reshape(-1)[0] for leaf in jax.tree.leaves(dparams))
    return body
  return make


def _dense_step(x, params):
  from pangu.nn.moe.experts import swiglu
  from pangu.nn.norms import rms_norm
  return swiglu(rms_norm(x, params["scale"], 1e-5), params["gate"], params["up"], params["down"])


def _attention_step(x, params):
  from pangu.nn.attention import causal_mask, dot_product_attention
  b, s = x.shape[:2]
  heads, dh = ATTENTION_PROFILE["heads"], ATTENTION_PROFILE["head_dim"]
  positions = jnp.broadcast_to(jnp.arange(s), (b, s))
  q = x.reshape(b, s, heads, dh) * params["scale"]
  return dot_product_attention(q, q, q, causal_mask(positions, positions)).reshape(x.shape)


def _experts_step(x, params):
  from pangu.nn.moe.experts import ExpertWeights, routed_experts
  experts = ExpertWeights(params["gate"], params["up"], params["down"])
  return routed_experts(x, params["weights"], params["ids"].astype(jnp.int32), experts, implementation="blocked")


def _profile_params() -> dict[str, tuple[tuple[int, ...], dict]]:
  """(per-device input shape, stacked per-step parameters) of each family's profile."""
  n, key = PROFILE_CHAIN[1], jax.random.key(2)
  normal = lambda shape, scale: jax.random.normal(key, (n, *shape), jnp.float32) * scale
  d, f = DENSE_PROFILE["d"], DENSE_PROFILE["f"]
  dense = {"scale": jnp.ones((n, d)), "gate": normal((d, f), d**-0.5), "up": normal((d, f), d**-0.5),
           "down": normal((f, d), f**-0.5)}
  attention = {"scale": jnp.full((n,), 0.1)}
  e, k, t = EXPERTS_PROFILE["experts"], EXPERTS_PROFILE["top_k"], EXPERTS_PROFILE["tokens"]
  d, f = EXPERTS_PROFILE["d"], EXPERTS_PROFILE["f"]
  ids = jax.random.randint(key, (n, t, k), 0, e).astype(jnp.float32)  # float: jax.grad skips it as a constant
  experts = {"gate": normal((e, d, f), d**-0.5), "up": normal((e, d, f), d**-0.5), "down": normal((e, f, d), f**-0.5),
             "weights": jnp.full((n, t, k), 0.5), "ids": ids}
  a = ATTENTION_PROFILE
  return {"dense": ((DENSE_PROFILE["tokens"], DENSE_PROFILE["d"]), dense),
          "attention": ((a["batch"], a["seq"], a["heads"] * a["head_dim"]), attention),
          "experts": ((t, EXPERTS_PROFILE["d"]), experts)}


PROFILE_STEPS = {"dense": _dense_step, "attention": _attention_step, "experts": _experts_step}


def _weights(size: int, count: int) -> jax.Array:
  return jax.random.normal(jax.random.key(1), (count, size, size), jnp.float32) / np.sqrt(size)


def _normalise_chain(repeat: int):
  def body(x):
    for _ in range(repeat):
      x = x / (jnp.sum(jnp.abs(x), axis=-1, keepdims=True) + 1.0)
    return x
  return body


def _collective_chain(kind: str | None, axis: str):
  """Chains of R steps of (element-wise scale, then the collective); kind None: the scale alone."""
  def make(repeat: int):
    def body(x):
      for _ in range(repeat):
        x = x * 1.0001
        if kind == "all_gather":
          x = jax.lax.all_gather(x, axis, axis=0, tiled=True)[:x.shape[0]]
        elif kind == "psum_scatter":
          x = jax.lax.psum_scatter(x, axis, scatter_dimension=0, tiled=True)
          x = jnp.concatenate([x] * jax.lax.axis_size(axis), axis=0)
        elif kind == "psum":
          x = jax.lax.psum(x, axis) * 0.5
        elif kind == "all_to_all":
          x = jax.lax.all_to_all(x, axis, 0, 0, tiled=True)
      return x
    return body
  return make


def _optimizer_benchmark(mesh) -> Benchmark:
  import optax

  from pangu.train.config import TrainConfig
  from pangu.train.optim import make_optimizer
  tx = make_optimizer(TrainConfig(warmup_steps=1, total_steps=10))
  leaves = 16
  params = {f"w{i}": jnp.full((OPTIMIZER_PARAMS // leaves,), 0.1, jnp.float32) for i in range(leaves)}
  replicated = NamedSharding(mesh, PartitionSpec())
  params = jax.device_put(params, replicated)
  state = jax.device_put(tx.init(params), replicated)

  def update(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, optax.tree.norm(grads), optax.tree.norm(updates)
  return _benchmark("optimizer", jax.jit(update), params, params, state)


def benchmarks(*, quick: bool = False) -> list[Benchmark]:
  """Every microbenchmark, compiled and warmed up."""
  if len(jax.devices()) != 8:
    raise ValueError(f"calibration needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), got "
                     f"{len(jax.devices())}")
  mesh = _mesh()
  result = []
  for size in MATMUL_SIZES[:3] if quick else MATMUL_SIZES:
    result += _chains(f"matmul/{size}", mesh, _matmul_chain, (size, size), CHAIN, _weights(size, CHAIN[1]))
  result += _chains(f"matmul/{TINY}", mesh, _matmul_chain, (TINY, TINY), STATIC_CHAIN, _weights(TINY, STATIC_CHAIN[1]))
  for family, (shape, params) in _profile_params().items():
    for grad in (False, True):
      result += _chains(f"profile/{family}/{'grad' if grad else 'forward'}", mesh,
                        _profile_chain(PROFILE_STEPS[family], grad), shape, PROFILE_CHAIN, params)
  result += _chains("normalise", mesh, _normalise_chain, (8, 64), STATIC_CHAIN)
  copy_elements = (1 << 21) if quick else (1 << 22)
  result.append(_per_device(f"copy/{copy_elements}", mesh, lambda x: x * 1.0001 + 1.0, (copy_elements,)))
  for nbytes in COLLECTIVE_BYTES:
    shape = (nbytes // (4 * 64), 64)
    result += _chains(f"scale/{nbytes}", mesh, _collective_chain(None, MESH_AXES[0]), shape)
    for axis in MESH_AXES:
      for kind in COLLECTIVES:
        result += _chains(f"collective/{axis}/{kind}/{nbytes}", mesh, _collective_chain(kind, axis), shape)
  result.append(_optimizer_benchmark(mesh))
  leaves = [jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, PartitionSpec(MESH_AXES)))
            for _ in range(OVERHEAD_LEAVES)]
  result.append(_benchmark("dispatch", jax.jit(lambda *xs: [x + 1 for x in xs]), *leaves))
  return result


def _slope(medians: dict[str, float], name: str, chain: tuple[int, int] = CHAIN) -> float:
  return max(medians[f"{name}/{chain[1]}"] - medians[f"{name}/{chain[0]}"], 0.0) / (chain[1] - chain[0])


def _fit_alpha_beta(points: list[dict], size: int) -> tuple[float, float]:
  """seconds ≈ phases · (α + (n − 1)/n · V · β) by least squares on relative error."""
  phases = np.array([PHASES[p["kind"]] for p in points], float)
  volume = np.array([p["bytes"] for p in points], float) * (size - 1) / size
  seconds = np.array([p["seconds"] for p in points], float)
  design = np.stack([phases, phases * volume], axis=1) / seconds[:, None]
  (alpha, beta), *_ = np.linalg.lstsq(design, np.ones_like(seconds), rcond=None)
  return max(float(alpha), 1e-7), max(float(beta), 1e-13)


def _predict_collective(point: dict, alpha: float, beta: float, size: int) -> float:
  return PHASES[point["kind"]] * (alpha + (size - 1) / size * point["bytes"] * beta)


def _device_spec(fitted: dict) -> DeviceSpec:
  """The fitted CPU device: one of 8 fake devices, all busy."""
  return dataclasses.replace(
      cpu(1, matmul_flops=fitted["matmul_flops"], copy_bandwidth=fitted["copy_bandwidth"]).device,
      name="cpu (8 fake devices, calibrated)", matmul_static_cost=fitted["matmul_static_cost"],
      vector_static_cost=fitted["vector_static_cost"], hbm_bytes=16 * 1024**3)


def _profile_ops(family: str) -> list[operators.Op]:
  """The simulator's operators for one step of a family's profile (float32, one device)."""
  if family == "dense":
    tokens, d, f = DENSE_PROFILE["tokens"], DENSE_PROFILE["d"], DENSE_PROFILE["f"]
    ctx = operators.OpContext(tokens=tokens, kv_len=1, activation_bytes=4, weight_bytes=4)
    return [operators.norm_op("norm", ctx, d)] + operators.swiglu_ops("ffn", ctx, d, f)
  if family == "attention":
    a = ATTENTION_PROFILE
    ctx = operators.OpContext(tokens=a["batch"] * a["seq"], kv_len=a["seq"], activation_bytes=4, weight_bytes=4,
                              fused_attention=False)
    return operators.attention_core_ops(ctx, a["heads"], a["head_dim"], a["head_dim"], 2 * a["heads"] * a["head_dim"])
  e = EXPERTS_PROFILE
  moe = MoEConfig(num_experts=e["experts"], top_k=e["top_k"], expert_dim=e["f"], router="topk")
  shape = ModelShape(name="profile", vocab_size=8, d_model=e["d"], n_layers=1, attention=GQA(1, 1, 8), d_ff=8,
                     moe=moe)
  ctx = operators.OpContext(tokens=e["tokens"], kv_len=1, activation_bytes=4, weight_bytes=4, expert_block_rows=128)
  return [op for op in operators.moe_ops(shape, ctx) if op.family == "experts"]


def _fit_op_costs(medians: dict[str, float], fitted_device: dict) -> dict[str, dict[str, float]]:
  """Forward scale (measured / modelled) and backward factor (measured backward / forward) per family."""
  device = _device_spec(fitted_device)
  result = {}
  for family in operators.FAMILIES:
    forward = _slope(medians, f"profile/{family}/forward", PROFILE_CHAIN)
    both = _slope(medians, f"profile/{family}/grad", PROFILE_CHAIN)
    modelled = operators.forward_seconds(_profile_ops(family), device, "float32")
    result[family] = {"forward_scale": forward / modelled, "backward_factor": max(both - forward, 0.0) / forward,
                      "measured_forward_s": forward, "measured_forward_backward_s": both,
                      "modelled_forward_s": modelled}
  return result


def fit(times: dict[str, list[float]]) -> dict:
  """The calibration record from benchmark times (medians over rounds)."""
  medians = {name: float(np.median(values)) for name, values in times.items()}
  sizes = [size for size in MATMUL_SIZES if f"matmul/{size}/{CHAIN[0]}" in medians]
  matmul = [{"size": size, "flops": 2.0 * size**3, "seconds": _slope(medians, f"matmul/{size}")} for size in sizes]
  matmul_static = _slope(medians, f"matmul/{TINY}", STATIC_CHAIN)
  matmul_rate = float(np.median([m["flops"] / max(m["seconds"] - matmul_static, 1e-7) for m in matmul[1:]]))
  (copy_name,) = [name for name in medians if name.startswith("copy/")]
  copy_bandwidth = 2 * 4 * int(copy_name.split("/")[1]) / medians[copy_name]

  axes = {}
  for axis, size in zip(MESH_AXES, MESH_SHAPE):
    points = []
    for kind in COLLECTIVES:
      for nbytes in COLLECTIVE_BYTES:
        seconds = _slope(medians, f"collective/{axis}/{kind}/{nbytes}") - _slope(medians, f"scale/{nbytes}")
        points.append({"kind": kind, "bytes": nbytes, "seconds": max(seconds, 1e-6)})
    alpha_train, beta_train = _fit_alpha_beta([p for p in points if p["bytes"] != HELD_OUT_BYTES], size)
    held = [p for p in points if p["bytes"] == HELD_OUT_BYTES]
    held_error = float(np.mean([abs(_predict_collective(p, alpha_train, beta_train, size) / p["seconds"] - 1)
                                for p in held]))
    alpha, beta = _fit_alpha_beta(points, size)
    axes[axis] = {"size": size, "alpha": alpha, "beta": beta, "held_out_bytes": HELD_OUT_BYTES,
                  "held_out_mape": held_error, "points": points}
  device = {"matmul_flops": matmul_rate, "matmul_static_cost": matmul_static,
            "vector_static_cost": _slope(medians, "normalise", STATIC_CHAIN), "copy_bandwidth": copy_bandwidth}
  return {
      "command": "python -m pangu.sim calibrate --out=pangu/sim/calibration/cpu8.json",
      "mesh": dict(zip(MESH_AXES, MESH_SHAPE)),
      "device": device,
      "op_costs": _fit_op_costs(medians, device),
      "optimizer_bytes_per_param": medians["optimizer"] * copy_bandwidth / OPTIMIZER_PARAMS,
      "step_overhead": medians["dispatch"],
      "axes": axes,
      "matmul": matmul,
      "medians": medians,
      "machine": {"cpu_count": os.cpu_count(), "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")},
  }


def run_microbenchmarks(*, quick: bool = False, rounds: int | None = None) -> dict:
  """Builds, times (interleaved rounds) and fits every microbenchmark: the calibration record."""
  return fit(time_rounds(benchmarks(quick=quick), rounds or (5 if quick else 9)))


def save(record: dict, path: str = DEFAULT_PATH) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  return path


@dataclasses.dataclass(frozen=True)
class Calibration:
  """A calibrated CPU topology and the options that describe our CPU train step."""

  topology: Topology
  options: SimOptions
  record: dict


@functools.lru_cache(maxsize=8)
def load(path: str = DEFAULT_PATH) -> Calibration:
  """The stored calibration as a `Topology` (axes `node` x `npu`, the host as one node) and `SimOptions`.

  The fitted α and β include every overhead, so link efficiency is 1 and the collective static cost 0; the
  fitted static costs go to the device. Our CPU decoder writes the S x S attention scores, its dropless experts
  run the `blocked` grouped matmul, and XLA:CPU does not overlap the gradient reduction.
  """
  with open(path) as f:
    record = json.load(f)
  device = _device_spec(record["device"])
  axes = tuple(AxisSpec(name=name, size=fit["size"], bandwidth=1.0 / fit["beta"], latency=fit["alpha"],
                        kind=LinkKind.FULL_MESH, fabric="shared-memory", intra_node=True, efficiency=1.0)
               for name, fit in record["axes"].items())
  costs = tuple((family, operators.FamilyCost(cost["forward_scale"], cost["backward_factor"]))
                for family, cost in record["op_costs"].items())
  options = SimOptions(fused_attention=False, overlap_grad_reduce=False, expert_block_rows=128,
                       step_overhead=record["step_overhead"],
                       optimizer_bytes_per_param=record["optimizer_bytes_per_param"], op_costs=costs)
  return Calibration(Topology("cpu8", axes, device), options, record)
