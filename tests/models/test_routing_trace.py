"""The expert ids read back from a forward pass are the ones the MoE layers counted."""

import jax
import numpy as np
import pytest

from pangu import models
from pangu.nn import moe


@pytest.mark.parametrize("scan_layers", [True, False])
def test_routed_ids_match_the_expert_load_the_layers_sowed(scan_layers):
  config = models.tiny(moe=moe.MoEConfig(num_experts=8, top_k=2, expert_dim=16, router="topk"), first_k_dense=1,
                       scan_layers=scan_layers)
  params = models.init_params(config, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (3, 11)).astype(np.int32)
  ids = models.routed_expert_ids(config, params, tokens)
  assert sorted(ids) == [i for i in range(config.n_layers) if config.is_moe_layer(i)]
  _, variables = jax.jit(lambda params: models.Decoder(config).apply({"params": params}, tokens,
                                                                     mutable=[moe.MOE_COLLECTION]))(params)
  sowed = np.asarray(moe.moe_metrics(variables[moe.MOE_COLLECTION])["expert_load"])  # [MoE layers, N]
  counted = np.stack([np.bincount(np.asarray(ids[i]).reshape(-1), minlength=8) for i in sorted(ids)])
  np.testing.assert_array_equal(counted, sowed)


def test_a_dense_model_has_no_routing_to_trace():
  with pytest.raises(ValueError, match="config.moe is None"):
    models.routed_expert_ids(models.tiny(), {}, np.zeros((1, 2), np.int32))
