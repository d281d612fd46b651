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
- operator profiles (the Pangu simulators profile operators, then compose them; Ultra MoE, secondary): each
  family of `operators.FAMILIES` is profiled as our decoder runs it: the library's own modules on [B, S, D]
  activations, chained R times, forward and under `jax.grad`; the layers' families by a `jax.lax.scan` over
  stacked per-layer parameters (what the decoder's `nn.scan` lowers to). `attention` is the attention half of
  a pre-norm layer (RMSNorm, `Attention`: projections, RoPE, core, output; residual), `dense` a whole
  `DecoderBlock` less that half at the same shape (its FFN, norm and residual), `experts` the blocked dropless
  `routed_experts`, `head` the final norm, vocab projection and `cross_entropy_loss` (unscanned, as the
  decoder runs it once). A family's forward scale is the geometric mean over its reference shapes (on either
  side of the validated range, none a validated config) of the measured time over the roofline model of the
  same ops with the constants above. Its backward pass is fitted as a FLOP-bound part (`backward_factor` x
  the forward roofline) plus an activation-bound part (`saved_passes` passes over the saved activations):
  XLA:CPU transposes the [B, S, *] activations and gradients for the weight gradients and the layer scan
  stacks every saved activation in the forward pass and slices it back in the backward pass, so the
  backward costs 4-10x the forward, more for narrow layers, not the 2x of proxies (2-D matmuls in an
  unrolled chain), which is what the simulator under-predicted before.
- expert parallelism (`EP_PROFILES`): the library's MoE `DecoderBlock`, scanned, forward and under `jax.grad`, on
  a (data, expert) mesh of the 8 devices with the default logical rules, so its own shard_map exchange runs
  (the fixed all-to-all of MoGE or the ring of top-K). The layer less what the simulator gives its attention
  and dense parts, over the simulator's experts compute plus EP exchange, is each exchange's measured scale
  (`ExchangeCost`, forward and backward): the single-device experts profile and the α-β exchange alone
  under-predicted expert-parallel steps by 26-44% (the ring scatters and gathers every token of the group,
  and the blocked experts scan blocks sized for all of them).
- optimizer: the AdamW update of our train step (clip, update, the gradient, update and per-layer norms) on a
  reference decoder's replicated parameters, as a data-parallel step runs it; stored as effective HBM bytes
  per parameter at the copy bandwidth. The cost per parameter grows with the leaves' sizes (small leaves stay
  in cache between the update's passes), so the reference has our decoder's stacked layer leaves.
- step overhead: a jitted call on a state-sized pytree of tiny sharded arrays (dispatch and host work).

Stability (the fitted constants moved 2-3x between runs of the shared machine before): compile time is
excluded (each benchmark is built and warmed first, and a whole warm-up round is dropped), every call is
blocked on, and the benchmarks run in interleaved rounds, each in a fresh random order (with the measured
train steps, when validating), so that the machine's drift and bursts hit them alike; each benchmark's time is
the best of its rounds (`best_of`), and the fits are robust: α-β and backward fits minimise a Cauchy loss of
the log time (`robust_fit`), forward scales are medians of ratios. `stability` compares the constants of two
calibrations. Regenerate with
`python -m pangu.sim calibrate --out=pangu/sim/calibration/cpu8.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jax.sharding import NamedSharding, PartitionSpec

from pangu.config_checks import positive_ints
from pangu.models.config import TransformerConfig
from pangu.nn.moe.config import MoEConfig
from pangu.parallel.topology import AxisSpec, DeviceSpec, LinkKind, Topology, cpu
from pangu.sim import operators
from pangu.sim.shapes import GQA, ModelShape, from_config
from pangu.sim.training import ExchangeCost, SimOptions

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
STATIC_CHAIN = (1, 33)  # long chains of tiny ops: the per-op static cost stands out of the noise
TINY = 16
# Leaves of the state-sized pytree for the step overhead: a small decoder's params + two AdamW moments + batch.
OVERHEAD_LEAVES = 64


def decoder_config(d_model: int, n_layers: int, *, vocab_size: int = 2048, moe: MoEConfig | None = None
                   ) -> TransformerConfig:
  """The small decoders of our CPU measurements: 4 heads of d_model / 4, 4 kv heads, FFN 2.75 D."""
  return TransformerConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=4,
                           d_ff=int(2.75 * d_model) // 8 * 8, moe=moe)


@dataclasses.dataclass(frozen=True)
class LayerProfile:
  """Per-device reference shape of the layer profiles: x [batch, seq, d_model] through the attention half, a
  dense layer and a MoE layer whose routed experts are `moe`."""

  batch: int
  seq: int
  d_model: int
  moe: MoEConfig

  def __post_init__(self):
    positive_ints(self, "batch", "seq", "d_model")

  def config(self, *, sparse: bool = False) -> TransformerConfig:
    return decoder_config(self.d_model, PROFILE_CHAIN[1], vocab_size=8, moe=self.moe if sparse else None)


@dataclasses.dataclass(frozen=True)
class HeadProfile:
  """Per-device reference shape of the `head` profile: x [batch, seq, d_model] to logits over `vocab_size`."""

  batch: int
  seq: int
  d_model: int
  vocab_size: int

  def __post_init__(self):
    positive_ints(self, "batch", "seq", "d_model", "vocab_size")


# Reference shapes on either side of the validated range, from many narrow tokens to few wide ones; top-K and
# MoGE routers, 6 to 12 experts.
LAYER_PROFILES = (
    LayerProfile(4, 128, 160, MoEConfig(num_experts=6, top_k=2, expert_dim=96, router="topk", aux_loss_coef=0.0)),
    LayerProfile(2, 128, 288, MoEConfig(num_experts=12, top_k=4, expert_dim=160, router="moge", num_groups=4,
                                        aux_loss_coef=0.0)),
    LayerProfile(1, 192, 448, MoEConfig(num_experts=8, top_k=2, expert_dim=224, router="topk", aux_loss_coef=0.0)),
)
@dataclasses.dataclass(frozen=True)
class ExpertParallelProfile:
  """A MoE layer under expert parallelism: `layer`'s per-device shape on the 8 devices of a (data = 8 / ep,
  expert = ep) mesh, through the exchange our layer picks there (`pangu.nn.moe.parallel.exchange_for`)."""

  layer: LayerProfile
  ep: int

  def __post_init__(self):
    positive_ints(self, "ep")
    if 8 % self.ep or self.ep == 1 or self.layer.moe.num_experts % self.ep:
      raise ValueError(f"ExpertParallelProfile.ep must be 2, 4 or 8 and divide the {self.layer.moe.num_experts} "
                       f"experts, got {self.ep}")

  @property
  def dispatch(self) -> str:
    """The simulator's name of the exchange (`Plan.ep_dispatch`): `flat` for the fixed all-to-all, else `ring`."""
    from pangu.nn.moe.parallel import exchange_for
    return "flat" if exchange_for(self.layer.moe, self.ep) == "fixed" else "ring"


HEAD_PROFILES = (HeadProfile(batch=3, seq=128, d_model=160, vocab_size=1536),
                 HeadProfile(batch=1, seq=192, d_model=448, vocab_size=3072))
# MoE layers under expert parallelism, both exchanges at two EP degrees each (none a validated config);
# quick mode keeps the first two (one per exchange).
EP_PROFILES = (
    ExpertParallelProfile(LayerProfile(2, 128, 192, MoEConfig(num_experts=8, top_k=2, expert_dim=128, router="topk",
                                                              aux_loss_coef=0.0)), ep=4),
    ExpertParallelProfile(LayerProfile(2, 128, 192, MoEConfig(num_experts=16, top_k=4, expert_dim=96, router="moge",
                                                              num_groups=4, aux_loss_coef=0.0)), ep=4),
    ExpertParallelProfile(LayerProfile(4, 128, 160, MoEConfig(num_experts=16, top_k=4, expert_dim=80, router="topk",
                                                              aux_loss_coef=0.0)), ep=2),
    ExpertParallelProfile(LayerProfile(4, 128, 128, MoEConfig(num_experts=16, top_k=8, expert_dim=64, router="moge",
                                                              num_groups=8, aux_loss_coef=0.0)), ep=8),
)
# The decoder whose replicated parameters the optimizer benchmark updates.
OPTIMIZER_DECODER = {"d_model": 192, "n_layers": 4, "vocab_size": 1024}


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


def time_rounds(benchmarks: list[Benchmark], rounds: int, log: Callable[[str], None] = print, *,
                warmup_rounds: int = 1, seed: int = 0) -> dict[str, list[float]]:
  """Seconds of every benchmark in each of `rounds` interleaved rounds.

  Each round runs every benchmark once in a fresh random order, so the two chain lengths of one benchmark and
  the benchmarks of one family never run back to back in a fixed position: a burst of load on the shared
  machine lands on a different benchmark each round, and the best of the rounds (`best_of`) escapes it. The
  first `warmup_rounds` rounds (caches, allocator, thread pools settling) are not recorded.
  """
  times = {b.name: [] for b in benchmarks}
  order = np.random.default_rng(seed)
  for index in range(warmup_rounds + rounds):
    for position in order.permutation(len(benchmarks)):
      benchmark = benchmarks[position]
      start = time.perf_counter()
      benchmark.run()
      if index >= warmup_rounds:
        times[benchmark.name].append(time.perf_counter() - start)
    log(f"round {index + 1}/{warmup_rounds + rounds} done" + (" (warm-up)" if index < warmup_rounds else ""))
  return times


def best_of(values: list[float]) -> float:
  """A benchmark's time: the best of its rounds. The load of the shared machine only ever adds time, so the
  fastest round is the least disturbed one and the statistic that moves least between runs; calibration and
  measured step times use the same one."""
  return float(np.min(values))


def robust_fit(design: np.ndarray, measured: np.ndarray, offset: np.ndarray | float = 0.0, *,
               f_scale: float = 0.05) -> np.ndarray:
  """Non-negative c with design @ c + offset ≈ measured, robust to outliers.

  Minimises Σ ρ(log((design @ c + offset) / measured)) with ρ the Cauchy loss (quadratic for errors below
  `f_scale`, logarithmic above): relative errors, so small and large sizes weigh alike, and a measurement far
  off the others (a burst of load) barely pulls the fit. Starts from non-negative least squares on
  relative error; columns are normalised so constants of very different magnitudes (α ~ 1e-5 s,
  β ~ 1e-9 s/byte) fit alike.
  """
  measured = np.asarray(measured, float)
  offset = np.broadcast_to(np.asarray(offset, float), measured.shape)
  norms = np.maximum(np.abs(design).max(axis=0), 1e-300)
  scaled = design / norms
  start, _ = scipy.optimize.nnls(scaled / measured[:, None], (measured - offset) / measured)
  start = np.maximum(start, 1e-9 * max(float(start.max()), 1e-9))
  residual = lambda c: np.log(np.maximum(scaled @ c + offset, 1e-30) / measured)
  result = scipy.optimize.least_squares(residual, start, bounds=(0.0, np.inf), loss="cauchy", f_scale=f_scale,
                                        xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=2000)
  return result.x / norms


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


def _chain(step: Callable, grad: bool, *, scanned: bool):
  """R applications of `x = step(x, params_i)`, by a scan over the first R of the stacked parameters as the
  decoder scans its layers (`scanned`) or unrolled; under `grad` the gradient w.r.t. x and every params_i."""
  def make(repeat: int):
    def forward(x, params):
      if scanned:
        x, _ = jax.lax.scan(lambda h, p: (step(h, p), None), x, jax.tree.map(lambda p: p[:repeat], params))
        return x
      for i in range(repeat):
        x = step(x, jax.tree.map(lambda p: p[i], params))
      return x

    def body(x, params):
      if not grad:
        return forward(x, params)
      dx, dparams = jax.grad(lambda x, p: jnp.sum(forward(x, p)), argnums=(0, 1))(x, params)
      return dx + sum(leaf.reshape(-1)[0] for leaf in jax.tree.leaves(dparams))
    return body
  return make


def _layer_profile(profile: LayerProfile, part: Literal["attention", "dense", "moe"]
                   ) -> tuple[tuple[int, ...], Callable, dict]:
  """(per-device input shape, step, stacked parameters) of the library's pre-norm `DecoderBlock`, dense or MoE
  (its `moe` collection of losses and load metrics folded into the output, as the train step uses them), or
  of its attention half."""
  import flax.linen as nn

  from pangu.models.transformer import DecoderBlock
  from pangu.nn import init as inits
  from pangu.nn.attention import Attention, AttentionMask
  from pangu.nn.moe import MOE_COLLECTION
  from pangu.nn.norms import RMSNorm

  class AttentionHalf(nn.Module):
    """x + Attention(RMSNorm(x)), the first half of `DecoderBlock`."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, mask):
      cfg = self.config
      attention = Attention(cfg.attention_config(0), inits.kernel_init(cfg.init_config),
                            inits.kernel_init(cfg.init_config, residual_output=True))
      h, _ = attention(RMSNorm(cfg.norm_eps)(x), mask)
      return x + h, None

  config = profile.config(sparse=part == "moe")
  module = AttentionHalf(config) if part == "attention" else DecoderBlock(config)
  shape = (profile.batch, profile.seq, profile.d_model)
  positions = jnp.broadcast_to(jnp.arange(profile.seq), shape[:2])
  mask = AttentionMask.self_attention(positions)
  x = jnp.zeros(shape, jnp.float32)
  params = jax.vmap(lambda key: nn.unbox(module.init(key, x, mask)["params"]))(
      jax.random.split(jax.random.key(2), PROFILE_CHAIN[1]))

  def step(h, p):
    (h, _), metrics = module.apply({"params": p}, h, mask, mutable=[MOE_COLLECTION])
    return h + 1e-9 * sum(jnp.sum(leaf) for leaf in jax.tree.leaves(metrics))
  return shape, step, params


def _expert_parallel_benchmarks(name: str, profile: ExpertParallelProfile) -> list[Benchmark]:
  """Chains of the library's MoE `DecoderBlock` (scanned, forward and under `jax.grad`) on the 8 devices of a
  (data, expert) mesh with the default logical rules, as the train step runs it: tokens split over the batch
  axes, experts over `expert`, the layer's own shard_map exchange between them."""
  import flax.linen as nn

  from pangu.models.transformer import DecoderBlock
  from pangu.nn.attention import AttentionMask
  from pangu.nn.moe import MOE_COLLECTION
  from pangu.parallel import rules
  from pangu.parallel.mesh import cpu_mesh

  layer, devices = profile.layer, len(jax.devices())
  module = DecoderBlock(layer.config(sparse=True))
  shape = (devices * layer.batch, layer.seq, layer.d_model)
  mask = AttentionMask.self_attention(jnp.broadcast_to(jnp.arange(layer.seq), shape[:2]))
  mesh = cpu_mesh(data=devices // profile.ep, expert=profile.ep)
  x = jnp.zeros(shape, jnp.float32)
  init = lambda key: module.init(key, x, mask)["params"]
  stacked = jax.tree.map(lambda sharding: NamedSharding(mesh, PartitionSpec(None, *sharding.spec)),
                         rules.param_shardings(jax.eval_shape(init, jax.random.key(0)), mesh))
  params = jax.device_put(jax.vmap(lambda key: nn.unbox(init(key)))(jax.random.split(jax.random.key(2),
                                                                                     PROFILE_CHAIN[1])), stacked)
  x = jax.device_put(jax.random.normal(jax.random.key(0), shape, jnp.float32),
                     rules.activation_sharding(mesh, (rules.BATCH, None, None)))

  def step(h, p):
    (h, _), metrics = module.apply({"params": p}, h, mask, mutable=[MOE_COLLECTION])
    return h + 1e-9 * sum(jnp.sum(leaf) for leaf in jax.tree.leaves(metrics))

  result = []
  for grad in (False, True):
    for repeat in PROFILE_CHAIN:
      fn = jax.jit(_chain(step, grad, scanned=True)(repeat))

      def run(fn=fn):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules.DEFAULT_RULES):
          jax.block_until_ready(fn(x, params))
      run()  # compile and warm up
      result.append(Benchmark(f"{name}/{'grad' if grad else 'forward'}/{repeat}", run))
  return result


def _head_profile(profile: HeadProfile) -> tuple[tuple[int, ...], Callable, dict]:
  """(per-device input shape, step, stacked parameters) of the decoder's output head and loss
  (`Decoder._logits`, `cross_entropy_loss`); each step feeds its loss back into x so the chain is serial."""
  import flax.linen as nn

  from pangu.models.transformer import cross_entropy_loss
  from pangu.nn.norms import RMSNorm

  shape, d, v = (profile.batch, profile.seq, profile.d_model), profile.d_model, profile.vocab_size
  norm = RMSNorm()
  targets = jax.random.randint(jax.random.key(4), shape[:2], 0, v)
  keys = jax.random.split(jax.random.key(2), PROFILE_CHAIN[1])
  params = {"norm": jax.vmap(lambda key: nn.unbox(norm.init(key, jnp.zeros(shape))["params"]))(keys),
            "lm_head": jax.random.normal(keys[0], (PROFILE_CHAIN[1], d, v), jnp.float32) * d**-0.5}

  def step(x, p):
    logits = jnp.einsum("bsd,dv->bsv", norm.apply({"params": p["norm"]}, x), p["lm_head"],
                        preferred_element_type=jnp.float32)
    return x * (1.0 + 1e-6 * cross_entropy_loss(logits, targets)[0])
  return shape, step, params


def _profiles() -> dict[str, tuple[tuple[tuple[int, ...], Callable, dict], ...]]:
  """Each family's profiles: `dense` and `experts` hold whole layers, less what other families explain when
  fitted."""
  layers = {family: tuple(_layer_profile(p, part) for p in LAYER_PROFILES)
            for family, part in (("attention", "attention"), ("dense", "dense"), ("experts", "moe"))}
  return {**layers, "head": tuple(_head_profile(p) for p in HEAD_PROFILES)}


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


def _optimizer_config() -> TransformerConfig:
  return decoder_config(OPTIMIZER_DECODER["d_model"], OPTIMIZER_DECODER["n_layers"],
                        vocab_size=OPTIMIZER_DECODER["vocab_size"])


def optimizer_params() -> int:
  """Parameters of the optimizer benchmark's decoder."""
  from pangu.models.transformer import init_params
  abstract = jax.eval_shape(functools.partial(init_params, _optimizer_config()), jax.random.key(0))
  return sum(leaf.size for leaf in jax.tree.leaves(abstract))


def _optimizer_benchmark(mesh) -> Benchmark:
  import optax

  from pangu.models.transformer import init_params
  from pangu.train.config import TrainConfig
  from pangu.train.optim import make_optimizer
  from pangu.train.step import per_layer_grad_norms
  config = _optimizer_config()
  tx = make_optimizer(TrainConfig(warmup_steps=1, total_steps=10))
  replicated = NamedSharding(mesh, PartitionSpec())
  params = jax.device_put(init_params(config, jax.random.key(3)), replicated)
  state = jax.device_put(tx.init(params), replicated)

  def update(params, grads, state):
    """The optimizer part of `pangu.train.step.make_train_step` (grads stand in with the parameters)."""
    grad_norm = optax.tree.norm(grads)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state, grad_norm, optax.tree.norm(updates),
            per_layer_grad_norms(config, grads))
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
  for family, profiles in _profiles().items():
    for index, (shape, step, params) in enumerate(profiles[:1] if quick else profiles):
      for grad in (False, True):
        result += _chains(f"profile/{family}/{index}/{'grad' if grad else 'forward'}", mesh,
                          _chain(step, grad, scanned=family != "head"), shape, PROFILE_CHAIN, params)
  for index, profile in enumerate(EP_PROFILES[:2] if quick else EP_PROFILES):
    result += _expert_parallel_benchmarks(f"ep/{index}", profile)
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


def _slope(best: dict[str, float], name: str, chain: tuple[int, int] = CHAIN) -> float:
  return max(best[f"{name}/{chain[1]}"] - best[f"{name}/{chain[0]}"], 0.0) / (chain[1] - chain[0])


def fit_alpha_beta(points: list[dict], size: int) -> tuple[float, float]:
  """seconds ≈ phases · (α + (n − 1)/n · V · β), fitted by `robust_fit` (log time, Cauchy loss)."""
  phases = np.array([PHASES[p["kind"]] for p in points], float)
  volume = np.array([p["bytes"] for p in points], float) * (size - 1) / size
  seconds = np.array([p["seconds"] for p in points], float)
  alpha, beta = robust_fit(np.stack([phases, phases * volume], axis=1), seconds)
  return max(float(alpha), 1e-7), max(float(beta), 1e-13)


def _predict_collective(point: dict, alpha: float, beta: float, size: int) -> float:
  return PHASES[point["kind"]] * (alpha + (size - 1) / size * point["bytes"] * beta)


def _device_spec(fitted: dict) -> DeviceSpec:
  """The fitted CPU device: one of 8 fake devices, all busy."""
  return dataclasses.replace(
      cpu(1, matmul_flops=fitted["matmul_flops"], copy_bandwidth=fitted["copy_bandwidth"]).device,
      name="cpu (8 fake devices, calibrated)", matmul_static_cost=fitted["matmul_static_cost"],
      vector_static_cost=fitted["vector_static_cost"], hbm_bytes=16 * 1024**3)


def layer_profile_ops(profile: LayerProfile, kind: str) -> list[operators.Op]:
  """The simulator's operators for one layer (`kind` dense or moe) of a layer profile: float32 on one device,
  our unfused attention core and blocked experts."""
  ctx = operators.OpContext(tokens=profile.batch * profile.seq, kv_len=profile.seq, activation_bytes=4,
                            weight_bytes=4, fused_attention=False, expert_block_rows=128)
  return operators.layer_ops(from_config(profile.config(sparse=kind == "moe"), "profile"), kind, ctx)


def head_ops(profile: HeadProfile) -> list[operators.Op]:
  """The simulator's head operators (final norm, vocab projection, cross-entropy) for one head profile step."""
  shape = ModelShape(name="profile", vocab_size=profile.vocab_size, d_model=profile.d_model, n_layers=1,
                     attention=GQA(1, 1, 8), d_ff=8)
  ctx = operators.OpContext(tokens=profile.batch * profile.seq, kv_len=profile.seq, activation_bytes=4,
                            weight_bytes=4)
  return operators.head_ops(shape, ctx)


def _family_point(forward: float, both: float, ops: list[operators.Op], device: DeviceSpec) -> dict[str, float]:
  """One reference shape of a family: measured forward and backward seconds and the model's terms."""
  return {"measured_forward_s": forward, "measured_backward_s": both - forward,
          "modelled_forward_s": operators.forward_seconds(ops, device, "float32"),
          "roofline_s": sum(operators.roofline_seconds(op, device, "float32") for op in ops),
          "backward_static_s": sum(operators.static_seconds(op, device, backward=True) for op in ops),
          "saved_traffic_s": sum(operators.saved_traffic_seconds(op, device) for op in ops)}


def _fit_family(points: list[dict[str, float]]) -> dict:
  """FamilyCost fields from a family's reference shapes.

  forward_scale: the median of measured / modelled forward over the shapes (one disturbed shape cannot move
  it). Then the backward, measured = scale · (backward_factor · roofline + static) + saved_passes · saved
  traffic, by `robust_fit`: the FLOP-bound and the activation-bound parts of the backward pass, which the
  shapes weigh differently (narrow layers move more activations per FLOP).
  """
  scale = float(np.median([max(p["measured_forward_s"], 1e-9) / p["modelled_forward_s"] for p in points]))
  measured = np.array([max(p["measured_backward_s"], 1e-9) for p in points])
  design = np.array([[scale * p["roofline_s"], p["saved_traffic_s"]] for p in points])
  static = scale * np.array([p["backward_static_s"] for p in points])
  factor, passes = robust_fit(design, measured, static)
  factor = max(float(factor), 1e-3)
  predicted = design @ np.array([factor, passes]) + static
  return {"forward_scale": scale, "backward_factor": factor, "saved_passes": float(passes),
          "backward_fit_errors": [float(e) for e in predicted / measured - 1], "shapes": points}


def fit_op_costs(best: dict[str, float], fitted_device: dict) -> dict[str, dict]:
  """Each family's `FamilyCost` fields from its profiles (`_fit_family`), each shape's numbers kept under
  `shapes`: `attention` from the attention halves; `dense` from the dense layers less their attention halves;
  `experts` from the MoE layers less their attention halves and the dense family's ops (the FFN norm and
  residual) at the fitted dense cost; `head` from the head profiles."""
  device = _device_spec(fitted_device)
  slope = lambda name: _slope(best, name, PROFILE_CHAIN)
  measured = lambda family, index: np.array([slope(f"profile/{family}/{index}/{kind}")
                                             for kind in ("forward", "grad")])
  select = lambda ops, family: [op for op in ops if op.family == family]
  points = {family: [] for family in operators.FAMILIES}
  indices = [i for i in range(len(LAYER_PROFILES)) if f"profile/attention/{i}/forward/{PROFILE_CHAIN[0]}" in best]
  for index in indices:
    attention = measured("attention", index)
    ops = layer_profile_ops(LAYER_PROFILES[index], "dense")
    points["attention"].append(_family_point(*attention, select(ops, "attention"), device))
    points["dense"].append(_family_point(*(measured("dense", index) - attention), select(ops, "dense"), device))
  for index, profile in enumerate(HEAD_PROFILES):
    if f"profile/head/{index}/forward/{PROFILE_CHAIN[0]}" in best:
      points["head"].append(_family_point(*measured("head", index), head_ops(profile), device))
  fits = {family: _fit_family(points[family]) for family in ("attention", "dense", "head")}
  dense_cost = {"dense": operators.FamilyCost(fits["dense"]["forward_scale"], fits["dense"]["backward_factor"],
                                              fits["dense"]["saved_passes"])}
  for index in indices:
    ops = layer_profile_ops(LAYER_PROFILES[index], "moe")
    dense = np.array([operators.forward_seconds(select(ops, "dense"), device, "float32", dense_cost, backward=b)
                      for b in (False, True)])
    remainder = measured("experts", index) - measured("attention", index) - np.array([dense[0], dense.sum()])
    points["experts"].append(_family_point(*remainder, select(ops, "experts"), device))
  fits["experts"] = _fit_family(points["experts"])
  return {family: fits[family] for family in operators.FAMILIES}


def fit_ep_costs(best: dict[str, float], calibration: Calibration) -> dict[str, dict]:
  """Each exchange's `ExchangeCost` from its expert-parallel profiles.

  Per profile, the measured layer (forward; backward = grad − forward) less what the simulator gives its
  attention and dense parts at `calibration` (which has no EP costs yet) is the MoE feed-forward under EP; its
  scale is that over the simulator's `experts` compute plus EP exchange. An exchange's scale is the median over
  its profiles; each profile's numbers are kept under `profiles`.
  """
  from pangu.sim.plan import FP32, Plan, TrainWorkload
  from pangu.sim.training import layer_cost
  points: dict[str, list[dict]] = {}
  for index, profile in enumerate(EP_PROFILES):
    if f"ep/{index}/forward/{PROFILE_CHAIN[0]}" not in best:
      continue
    layer = profile.layer
    forward, both = (_slope(best, f"ep/{index}/{kind}", PROFILE_CHAIN) for kind in ("forward", "grad"))
    plan = Plan(dp=8, ep=profile.ep, micro_batch=layer.batch, sequence_parallel=False, zero_stage=0,
                ep_dispatch=profile.dispatch)
    cost = layer_cost(from_config(layer.config(sparse=True), "ep_profile"), "moe", plan,
                      TrainWorkload(layer.seq, 8 * layer.batch), calibration.topology, FP32, calibration.options)
    modelled = {"forward": cost.expert_forward + cost.ep_forward, "backward": cost.expert_backward + cost.ep_backward}
    other = {"forward": cost.forward - modelled["forward"], "backward": cost.backward - modelled["backward"]}
    measured = {"forward": forward, "backward": both - forward}
    points.setdefault(profile.dispatch, []).append({
        "profile": index, "ep": profile.ep, "measured_forward_s": forward, "measured_backward_s": both - forward,
        "modelled_forward_s": cost.forward, "modelled_backward_s": cost.backward,
        **{f"{part}_scale": max(measured[part] - other[part], 1e-9) / modelled[part] for part in measured}})
  return {dispatch: {"forward_scale": float(np.median([p["forward_scale"] for p in rows])),
                     "backward_scale": float(np.median([p["backward_scale"] for p in rows])), "profiles": rows}
          for dispatch, rows in points.items()}


def fit(times: dict[str, list[float]]) -> dict:
  """The calibration record from benchmark times (the best of the rounds, `best_of`)."""
  best = {name: best_of(values) for name, values in times.items()}
  sizes = [size for size in MATMUL_SIZES if f"matmul/{size}/{CHAIN[0]}" in best]
  matmul = [{"size": size, "flops": 2.0 * size**3, "seconds": _slope(best, f"matmul/{size}")} for size in sizes]
  matmul_static = _slope(best, f"matmul/{TINY}", STATIC_CHAIN)
  matmul_rate = float(np.median([m["flops"] / max(m["seconds"] - matmul_static, 1e-7) for m in matmul[1:]]))
  (copy_name,) = [name for name in best if name.startswith("copy/")]
  copy_bandwidth = 2 * 4 * int(copy_name.split("/")[1]) / best[copy_name]

  axes = {}
  for axis, size in zip(MESH_AXES, MESH_SHAPE):
    points = []
    for kind in COLLECTIVES:
      for nbytes in COLLECTIVE_BYTES:
        seconds = _slope(best, f"collective/{axis}/{kind}/{nbytes}") - _slope(best, f"scale/{nbytes}")
        points.append({"kind": kind, "bytes": nbytes, "seconds": max(seconds, 1e-6)})
    alpha_train, beta_train = fit_alpha_beta([p for p in points if p["bytes"] != HELD_OUT_BYTES], size)
    held = [p for p in points if p["bytes"] == HELD_OUT_BYTES]
    held_error = float(np.mean([abs(_predict_collective(p, alpha_train, beta_train, size) / p["seconds"] - 1)
                                for p in held]))
    alpha, beta = fit_alpha_beta(points, size)
    axes[axis] = {"size": size, "alpha": alpha, "beta": beta, "held_out_bytes": HELD_OUT_BYTES,
                  "held_out_mape": held_error, "points": points}
  device = {"matmul_flops": matmul_rate, "matmul_static_cost": matmul_static,
            "vector_static_cost": _slope(best, "normalise", STATIC_CHAIN), "copy_bandwidth": copy_bandwidth}
  record = {
      "command": "python -m pangu.sim calibrate --out=pangu/sim/calibration/cpu8.json",
      "mesh": dict(zip(MESH_AXES, MESH_SHAPE)),
      "device": device,
      "op_costs": fit_op_costs(best, device),
      "optimizer_bytes_per_param": best["optimizer"] * copy_bandwidth / optimizer_params(),
      "step_overhead": best["dispatch"],
      "axes": axes,
      "matmul": matmul,
      "best_times": best,
      "machine": {"cpu_count": os.cpu_count(), "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")},
  }
  record["ep_costs"] = fit_ep_costs(best, from_record(record))
  return record


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
  """The stored calibration (`from_record`)."""
  with open(path) as f:
    return from_record(json.load(f))


def from_record(record: dict) -> Calibration:
  """A calibration record as a `Topology` (axes `node` x `npu`, the host as one node) and `SimOptions`.

  The fitted α and β include every overhead, so link efficiency is 1 and the collective static cost 0; the
  fitted static costs go to the device. Our CPU decoder writes the S x S attention scores, its dropless experts
  run the `blocked` grouped matmul, and XLA:CPU does not overlap the gradient reduction. The measured
  expert-parallel costs apply when the record has them.
  """
  device = _device_spec(record["device"])
  axes = tuple(AxisSpec(name=name, size=fit["size"], bandwidth=1.0 / fit["beta"], latency=fit["alpha"],
                        kind=LinkKind.FULL_MESH, fabric="shared-memory", intra_node=True, efficiency=1.0)
               for name, fit in record["axes"].items())
  costs = tuple((family, operators.FamilyCost(cost["forward_scale"], cost["backward_factor"], cost["saved_passes"]))
                for family, cost in record["op_costs"].items())
  ep_costs = tuple((dispatch, ExchangeCost(cost["forward_scale"], cost["backward_scale"]))
                   for dispatch, cost in record.get("ep_costs", {}).items())
  options = SimOptions(fused_attention=False, overlap_grad_reduce=False, expert_block_rows=128,
                       step_overhead=record["step_overhead"],
                       optimizer_bytes_per_param=record["optimizer_bytes_per_param"], op_costs=costs,
                       ep_costs=ep_costs)
  return Calibration(Topology("cpu8", axes, device), options, record)


def constants(record: dict) -> dict[str, float]:
  """The fitted constants of a calibration record, flat: device rates and static costs, each family's cost,
  the optimizer and step overhead, each axis's α and β, and the exchanges' measured scales when present."""
  flat = {f"device/{k}": float(v) for k, v in record["device"].items()}
  for family, cost in record["op_costs"].items():
    flat.update({f"{family}/{k}": float(cost[k]) for k in ("forward_scale", "backward_factor", "saved_passes")})
  flat["optimizer_bytes_per_param"] = float(record["optimizer_bytes_per_param"])
  flat["step_overhead"] = float(record["step_overhead"])
  for axis, fit in record["axes"].items():
    flat.update({f"axis/{axis}/alpha": float(fit["alpha"]), f"axis/{axis}/beta": float(fit["beta"])})
  for exchange, cost in record.get("ep_costs", {}).items():
    flat.update({f"ep/{exchange}/{k}": float(cost[k]) for k in ("forward_scale", "backward_scale")})
  return flat


def stability(record: dict, other: dict) -> dict:
  """How far the constants of two calibrations move: each constant in both and its change other / this − 1
  (a constant fitted to 0 in both does not move), the median and the largest absolute change."""
  this, that = constants(record), constants(other)
  rows = {}
  for name in sorted(set(this) & set(that)):
    a, b = this[name], that[name]
    change = 0.0 if a == b else (b / a - 1 if a else float("inf"))
    rows[name] = {"this_run": a, "other_run": b, "change": change}
  changes = {name: abs(row["change"]) for name, row in rows.items()}
  largest = max(changes, key=changes.get)
  return {"constants": rows, "median_abs_change": float(np.median(list(changes.values()))),
          "largest": {"name": largest, "change": rows[largest]["change"]}}
