"""Which experts a MoE model routes each token to: the router's choices read back from a forward pass.

Analyses of routing (device load per EP group, expert usage per text domain, experts an offloaded decode step
loads) need the expert ids of every MoE layer, which the layer does not return. They are recomputed here from
the layer's own router input (the `pre_mlp_norm` output, captured in one forward pass) and router weights, with
the same `route` the layer calls, so they are the ids the model used.
"""

import functools

import chex
import jax
import jax.numpy as jnp

from pangu.models.config import TransformerConfig
from pangu.models.transformer import Decoder, unstack_layers
from pangu.nn import linear
from pangu.nn.moe import MOE_COLLECTION, route


def routed_expert_ids(config: TransformerConfig, params: dict, tokens: jax.Array) -> dict[int, jax.Array]:
  """tokens [B, S] -> {layer index: expert ids [B, S, K]} for every MoE layer (either param layout)."""
  if config.moe is None:
    raise ValueError("routed_expert_ids needs a MoE model (config.moe is None)")
  chex.assert_rank(tokens, 2)
  return _routed_expert_ids(config, params, tokens)


@functools.partial(jax.jit, static_argnums=0)  # one compiled pass instead of a dispatch per op
def _routed_expert_ids(config: TransformerConfig, params: dict, tokens: jax.Array) -> dict[int, jax.Array]:
  if config.scanned:
    config, params = config.replace(scan_layers=False), unstack_layers(params, config.n_layers)
  _, captured = Decoder(config).apply(
      {"params": params}, tokens, capture_intermediates=lambda module, _: module.name == "pre_mlp_norm",
      mutable=["intermediates", MOE_COLLECTION])
  out = {}
  for i in range(config.n_layers):
    if not config.is_moe_layer(i):
      continue
    u = captured["intermediates"][f"layer_{i}"]["pre_mlp_norm"]["__call__"][0]
    router = params[f"layer_{i}"]["moe"]["router"]
    logits = linear.weight_einsum("bsd,dn->bsn", u.astype(jnp.float32), router.astype(jnp.float32))
    _, ids = route(logits.reshape(-1, logits.shape[-1]), config.moe)  # router_scale changes weights, not ids
    out[i] = ids.reshape(*tokens.shape, config.moe.top_k)
  return out
