"""The plain-XLA oracle of the skinny matmul: x [..., K] times an [out, in] kernel w [N, K]."""

import jax
import jax.numpy as jnp


def skinny_matmul(x: jax.Array, w: jax.Array, preferred_element_type: jnp.dtype | None = None) -> jax.Array:
  """x [..., K], w [N, K] -> [..., N]."""
  return jnp.einsum("...k,nk->...n", x, w, preferred_element_type=preferred_element_type)
