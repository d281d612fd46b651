"""Identities XLA does not fuse through: `fusion_fence` on a value, `cotangent_fence` on a value's cotangent.

Why: XLA:CPU strips `lax.optimization_barrier` before fusing, and its loop fusion duplicates cheap elementwise
producers into every consumer. A residual stream updated elementwise block after block (x + alpha * out in a
DiT) and its cotangent in the backward pass are then recomputed from their start inside each consumer: work
quadratic in depth. In the quantised-DiT experiment's full-mode train step (D = 128, depth 6, batch 128 of 16
tokens) such fusions took 349 of 612 ms on a 2-core AMD EPYC (jax.profiler), and the step went from 0.56 to
0.24 s with each block's output fenced in the backward pass only (fencing the forward too gained nothing more,
and 1000 samples of the forward-only sampler took 111 s fenced against 103 s unfenced). On CPU the fence is an
FFI custom call (fence.cc), which XLA cannot fuse; elsewhere it is `lax.optimization_barrier`, which the GPU
and TPU compilers keep.
"""

import functools

import jax

from pangu_kernels.fence import build

IMPLEMENTATIONS = ("cpu", "barrier")


def cpu_kernel_supported() -> bool:
  """Whether the fences use the FFI call: the CPU backend, no device mesh (XLA cannot split a custom call over
  devices) and the kernel built here."""
  return jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().size <= 1 and build.register()


def fusion_fence(x: jax.Array, *, implementation: str | None = None) -> jax.Array:
  """x, unchanged, computed once. implementation: `cpu` (the FFI call), `barrier` (`lax.optimization_barrier`)
  or None: `cpu` where `cpu_kernel_supported`, else `barrier`. Not differentiable (see `cotangent_fence`)."""
  if implementation is None:
    implementation = "cpu" if cpu_kernel_supported() else "barrier"
  if implementation == "barrier":
    return jax.lax.optimization_barrier(x)
  if implementation != "cpu":
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  if not build.register():
    raise RuntimeError("the fence kernel is unavailable here (see the log); use implementation='barrier'")
  return jax.ffi.ffi_call(build.TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="broadcast_all",
                          input_output_aliases={0: 0})(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def cotangent_fence(x: jax.Array, implementation: str | None = None) -> jax.Array:
  """x, unchanged; in the backward pass its cotangent goes through `fusion_fence(g, implementation=...)`."""
  del implementation
  return x


def _cotangent_fence_fwd(x, implementation):
  del implementation
  return x, None


def _cotangent_fence_bwd(implementation, _, g):
  return (fusion_fence(g, implementation=implementation),)


cotangent_fence.defvjp(_cotangent_fence_fwd, _cotangent_fence_bwd)
