"""Memory estimates against the bytes a sharded train state really holds on the CPU mesh, and plans that do not
fit (or do not divide) rejected with the reason."""

import math

import flax.linen as nn
import jax
import pytest

from pangu.nn.moe.config import MoEConfig
from pangu.parallel import topology
from pangu.sim import (FP32, MIXED_BF16, DecodeWorkload, Infeasible, Plan, TrainWorkload, get_shape, simulate_decode,
                       simulate_training, ultra_moe_718b)
from pangu.sim.memory import stage_params, training_state_bytes
from pangu.sim.validation import ValidationCase
from pangu.train.config import TrainConfig
from pangu.models import abstract_params
from pangu.train.optim import make_optimizer
from pangu.train.step import state_shardings

MOGE = MoEConfig(num_experts=8, top_k=2, expert_dim=32, router="moge", num_groups=2, experts_implementation="dense")


def _bytes_per_device(case: ValidationCase) -> int:
  """Bytes of params + AdamW state one device holds: each leaf's shard shape under the train step's shardings
  (`state_shardings`), for the abstract parameters and optimizer state (nothing is allocated)."""
  from pangu.parallel import make_mesh
  model, train = case.model_config(), TrainConfig(warmup_steps=1, total_steps=10)
  shardings = state_shardings(model, train, make_mesh(topology.cpu(8), case.parallel_plan()))
  params = nn.unbox(abstract_params(model))
  state = (params, jax.eval_shape(make_optimizer(train).init, params))
  leaves, placements = jax.tree.leaves(state), jax.tree.leaves((shardings.params, shardings.opt_state))
  assert len(leaves) == len(placements)
  return sum(math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf, sharding in zip(leaves, placements))


@pytest.mark.parametrize("case", [
    ValidationCase("dense_fsdp4_tp2", 64, 2, (("fsdp", 4), ("tensor", 2)), vocab_size=512),
    ValidationCase("dense_dp8", 64, 2, (("data", 8),), vocab_size=512),
    ValidationCase("moge_fsdp2_ep2_tp2", 64, 2, (("fsdp", 2), ("expert", 2), ("tensor", 2)), vocab_size=512,
                   moe=MOGE),
], ids=lambda case: case.name)
def test_train_state_bytes_match_the_sharded_state(case):
  actual = _bytes_per_device(case)
  shape, plan, _ = case.to_sim()
  params = stage_params(shape, list(shape.layer_kinds()), plan, first=True, last=True)
  weights, _, optimizer = training_state_bytes(params, plan, FP32)
  assert (weights + optimizer) / actual == pytest.approx(1.0, abs=0.10)


A2_6K = topology.pod("atlas-800t-a2", 6144)
WORKLOAD = TrainWorkload(seq_len=4096, global_batch=1536)


def test_a_plan_that_overflows_hbm_is_rejected_with_the_parts():
  with pytest.raises(Infeasible, match=r"memory: needs \d+\.\d GiB of 64\.0 GiB \(params .*optimizer") as error:
    simulate_training(ultra_moe_718b(), Plan(tp=8, pp=1, ep=8, dp=768, micro_batch=2), WORKLOAD, A2_6K)
  assert error.value.kind == "memory"


def test_recomputation_rescues_an_activation_bound_plan():
  plan = Plan(tp=8, pp=16, vpp=2, ep=4, dp=48, micro_batch=2, recompute="selective")
  with pytest.raises(Infeasible, match="activations"):
    simulate_training(ultra_moe_718b(), plan, WORKLOAD, A2_6K)
  estimate = simulate_training(ultra_moe_718b(), plan.replace(recompute="full"), WORKLOAD, A2_6K)
  assert estimate.memory.total < 64 * 2**30


def test_divisibility_and_batch_reasons():
  with pytest.raises(Infeasible, match="tp=3 does not divide 128 heads"):
    simulate_training(ultra_moe_718b(), Plan(tp=3, dp=2048), WORKLOAD, A2_6K)
  with pytest.raises(Infeasible, match="ep=3 does not divide 256 experts"):
    simulate_training(ultra_moe_718b(), Plan(tp=8, ep=3, dp=768), WORKLOAD, A2_6K)
  with pytest.raises(Infeasible, match="global batch 1536 is not a multiple"):
    simulate_training(ultra_moe_718b(), Plan(tp=8, pp=16, ep=4, dp=48, micro_batch=64), WORKLOAD, A2_6K)


def test_bf16_on_the_300i_duo_fails_clearly():
  with pytest.raises(ValueError, match="does not support bfloat16"):
    simulate_decode(get_shape("pro-moe-72b"), Plan(tp=8, dp=1), DecodeWorkload(batch=8, context=2048),
                    topology.atlas_300i_duo(), MIXED_BF16)


def test_decode_kv_cache_overflow_is_named():
  shape = get_shape("pro-moe-72b")
  with pytest.raises(Infeasible, match="kv_cache"):
    simulate_decode(shape, Plan(tp=8, dp=1), DecodeWorkload(batch=4096, context=32768), topology.atlas_800i_a2())
