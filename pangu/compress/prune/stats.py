"""Calibration statistics accumulated batch by batch in a numerically safe streaming form.

Every importance score and every output fit of pangu.compress.prune is a function of means and centred
co-moments `sum_n (a_n - mean a)(b_n - mean b)` over calibration tokens. Summing raw products in float32 and
centring at the end loses the variance of channels whose mean is large (catastrophic cancellation), so each batch
is centred on its own mean on the device (float32, a few thousand tokens) and the batches are merged on the host in
float64 with the pairwise update of Chan, Golub and LeVeque ("Updating formulae and a pairwise algorithm for
computing sample variances", 1979):  C = C_1 + C_2 + n_1 n_2 / n (mean_1 - mean_2)(mean_1 - mean_2)^T.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnums=0)
def _batch_comoment(spec: str, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  mean_a, mean_b = a.mean(0), b.mean(0)
  return mean_a, mean_b, jnp.einsum(spec, a - mean_a, b - mean_b, precision=jax.lax.Precision.HIGHEST)


class Comoment:
  """Running means of two token-major variables a [n, ...] and b [n, ...] and their centred co-moment.

  `spec` is the einsum that contracts one batch's centred rows, with the token axis first on both inputs and
  absent from the output: "ni,nj->ij" is the full co-moment matrix, "nc,nc->c" the per-channel one (a variance
  when b is a), "nhd,ngd->hgd" one matrix over h, g per channel d. Results are float64 NumPy arrays.
  """

  def __init__(self, spec: str):
    inputs, output = spec.replace(" ", "").split("->")
    if any(not term.startswith("n") for term in inputs.split(",")) or "n" in output:
      raise ValueError(f"Comoment spec must contract a leading token axis 'n' on both inputs, got {spec!r}")
    self.spec = spec
    self.count = 0
    self.mean_a: np.ndarray | None = None
    self.mean_b: np.ndarray | None = None
    self.comoment: np.ndarray | None = None

  def add(self, a: jax.Array, b: jax.Array | None = None) -> None:
    """Folds in one batch of rows (b defaults to a: auto-moments)."""
    b = a if b is None else b
    chex.assert_equal_shape_prefix([a, b], 1)
    n = a.shape[0]
    if n == 0:
      return
    mean_a, mean_b, comoment = (np.asarray(v, np.float64) for v in _batch_comoment(self.spec, a, b))
    if self.count == 0:
      self.count, self.mean_a, self.mean_b, self.comoment = n, mean_a, mean_b, comoment
      return
    total = self.count + n
    delta_a, delta_b = mean_a - self.mean_a, mean_b - self.mean_b
    self.comoment = self.comoment + comoment + np.einsum(self.spec, delta_a[None], delta_b[None]) * (
        self.count * n / total)
    self.mean_a = self.mean_a + delta_a * (n / total)
    self.mean_b = self.mean_b + delta_b * (n / total)
    self.count = total

  @property
  def covariance(self) -> np.ndarray:
    """Population (ddof 0) covariance: the co-moment over the token count."""
    if not self.count:
      raise ValueError("Comoment: no rows were added")
    return self.comoment / self.count

  @property
  def second_moment(self) -> np.ndarray:
    """Uncentred mean product E[a b] (contracted by the spec)."""
    return self.covariance + np.einsum(self.spec, self.mean_a[None], self.mean_b[None])
