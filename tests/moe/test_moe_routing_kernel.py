"""The MoE layer on the fused Pallas MoGE routing kernel (interpreted on CPU) against the XLA router."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu import models
from pangu.nn import moe

# N = 16 experts in 4 groups, K' = 2; few tokens, since the interpreted kernel is slow.
CONFIG = moe.MoEConfig(num_experts=16, top_k=8, expert_dim=8, router="moge", num_groups=4, num_shared_experts=1,
                       router_scale=True, router_z_loss_coef=1e-3, experts_implementation="dense")
D = 16


def _loss(config: moe.MoEConfig, params, x, probe):
  y, state = moe.MoEFeedForward(config, d_model=D).apply({"params": params}, x, mutable=[moe.MOE_COLLECTION])
  metrics = moe.moe_metrics(state[moe.MOE_COLLECTION])
  return jnp.sum(y * probe) + metrics["aux_loss"] + metrics["router_z_loss"], y


def test_pallas_routing_gives_the_xla_outputs_and_gradients():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, D)), jnp.float32)
  probe = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  params = nn.unbox(moe.MoEFeedForward(CONFIG, d_model=D).init(jax.random.key(0), x)["params"])
  # A router scale away from ones, so that its gradient depends on which experts were chosen.
  params["router_scale"] = jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32)
  results = {}
  for implementation in ("xla", "pallas"):
    config = CONFIG.replace(routing_implementation=implementation)
    grad = jax.grad(lambda p, x: _loss(config, p, x, probe), argnums=(0, 1), has_aux=True)
    jaxpr = str(jax.make_jaxpr(grad)(params, x))
    assert ("pallas_call" in jaxpr) == (implementation == "pallas")
    results[implementation] = jax.jit(grad)(params, x)
  (want_params, want_x), want_y = results["xla"]
  (got_params, got_x), got_y = results["pallas"]
  np.testing.assert_allclose(got_y, want_y, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(got_x, want_x, rtol=1e-6, atol=1e-9)
  for name in ("router", "router_scale", "gate", "down"):
    assert np.abs(want_params[name]).max() > 0, name
    np.testing.assert_allclose(got_params[name], want_params[name], rtol=1e-6, atol=1e-9, err_msg=name)


def test_auto_is_xla_on_cpu_and_for_routers_without_a_kernel():
  assert jax.default_backend() == "cpu"
  assert moe.resolve_routing_implementation(CONFIG) == "xla"
  assert moe.resolve_routing_implementation(CONFIG.replace(routing_implementation="pallas")) == "pallas"
  topk = CONFIG.replace(router="topk")
  assert moe.resolve_routing_implementation(topk) == "xla"
  assert moe.resolve_routing_implementation(topk.replace(routing_implementation="xla")) == "xla"


@pytest.mark.parametrize("changes,message", [
    (dict(routing_implementation="triton"),
     "MoEConfig.routing_implementation must be one of ('auto', 'xla', 'pallas'), got 'triton'"),
    (dict(router="topk", routing_implementation="pallas"),
     "MoEConfig.routing_implementation='pallas' is the fused MoGE routing kernel; router='topk' has only"),
    (dict(router="group_limited", topk_groups=2, routing_implementation="pallas"),
     "router='group_limited' has only the 'xla' form"),
])
def test_invalid_routing_implementations_fail_clearly(changes, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    CONFIG.replace(**changes)


def test_configs_saved_before_the_field_still_load():
  old = {k: v for k, v in dataclasses.asdict(CONFIG).items() if k != "routing_implementation"}
  assert moe.MoEConfig(**old) == CONFIG and CONFIG.routing_implementation == "auto"
  saved = models.tiny(moe=CONFIG).to_dict()
  del saved["moe"]["routing_implementation"]
  assert models.TransformerConfig.from_dict(saved).moe == CONFIG
