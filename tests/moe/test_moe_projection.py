"""Every activation-weight product of the MoE and MoLE layers goes through `pangu.nn.linear.prepare_weight`.

The layers run un-jitted, so each call traces the patched `prepare_weight` afresh.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu.nn import linear, moe
from pangu.nn.mole import LookupExperts, MoLEConfig

D = 8
# The XLA router: the fused kernel's custom VJP has no forward mode.
MOE = moe.MoEConfig(num_experts=4, top_k=2, expert_dim=8, router="moge", num_groups=2, num_shared_experts=1,
                    routing_implementation="xla")
MOE_WEIGHTS = ("router", "gate", "up", "down", "shared_gate", "shared_up", "shared_down")
CASES = {
    "ragged": (MOE.replace(experts_implementation="ragged"), MOE_WEIGHTS),
    "blocked": (MOE.replace(experts_implementation="blocked"), MOE_WEIGHTS),
    "dense": (MOE.replace(experts_implementation="dense"), MOE_WEIGHTS),
    "selected": (MOE.replace(experts_implementation="selected"), MOE_WEIGHTS),
    "capacity": (MOE.replace(dispatch="capacity"), MOE_WEIGHTS),
    "mole": (MoLEConfig(num_experts=3, expert_dim=8), ("router", "up", "down")),
}


def _layer(name: str):
  """(apply(params) -> output, params, names of the weight params) of one case, on random inputs."""
  config, weights = CASES[name]
  rng = np.random.default_rng(0)
  inputs = [jnp.asarray(rng.normal(size=(2, 3, D)), jnp.float32) for _ in range(2 if name == "mole" else 1)]
  module = LookupExperts(config, d_model=D) if name == "mole" else moe.MoEFeedForward(config, d_model=D)
  params = nn.unbox(module.init(jax.random.key(0), *inputs)["params"])
  assert set(weights) <= set(params)
  apply = lambda p: module.apply({"params": p}, *inputs, mutable=[moe.MOE_COLLECTION])[0]
  return apply, params, weights


@pytest.mark.parametrize("name", CASES)
def test_every_weight_param_reaches_the_output_only_through_prepare_weight(name, monkeypatch):
  # Forward-mode tangents follow a param through gathers, vmaps, scans and loops, where its identity is lost:
  # with prepare_weight cutting the tangents, a weight's tangent reaches the output only by a product that
  # bypasses it. Unpatched, every weight's tangent reaches it.
  apply, params, weights = _layer(name)
  recorded = []

  def recorder(w):
    recorded.append(w.shape)
    return jax.lax.stop_gradient(w)

  def largest_tangents():
    """Per weight: max |output tangent| for a tangent of ones on that weight and zeros elsewhere."""
    one_hot = lambda weight: {k: jax.tree.map(jnp.ones_like if k == weight else jnp.zeros_like, v)
                              for k, v in params.items()}
    return {weight: np.abs(jax.jvp(apply, (params,), (one_hot(weight),))[1]).max() for weight in weights}

  assert all(largest_tangents().values())
  monkeypatch.setattr(linear, "prepare_weight", recorder)
  bypassed = [weight for weight, tangent in largest_tangents().items() if tangent]
  assert not bypassed, f"products with {bypassed} bypass linear.prepare_weight"
  assert recorded


@pytest.mark.parametrize("name", CASES)
def test_a_doubling_prepare_weight_equals_doubled_weights(name, monkeypatch):
  # Linear in each weight's use: prepare_weight(w) = 2 w must give exactly what doubled params give unpatched
  # (the router logits double, the expert products see 2 gate, 2 up, 2 down); a bypass sees w, not 2 w.
  apply, params, weights = _layer(name)
  doubled = {k: 2 * v if k in weights else v for k, v in params.items()}
  want, plain = apply(doubled), apply(params)
  monkeypatch.setattr(linear, "prepare_weight", lambda w: 2 * w)
  got = apply(params)
  assert np.abs(want - plain).max() > 1e-3
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
