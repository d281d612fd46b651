"""Performance simulator for model and parallelism choice (Pangu Pro MoE §2.3, Pangu Ultra MoE), validated
against measured train steps on the 8-device CPU mesh.

Modules, one idea each: `shapes` (model shapes and parameter counts), `plan` (plans, workloads, precision),
`placement` (groups on the device grid), `operators` (FLOPs and bytes per operator), `communication`
(collectives per group), `imbalance` (straggler factor from routing), `pipeline` (bubble and stages),
`memory` (bytes per device), `training` and `decode` (the composed estimates), `search`, `calibrate` (the
cpu(8) microbenchmarks) and `validation` (measured vs predicted). CLI: `python -m pangu.sim search ...`.
"""

from pangu.sim.decode import DecodeEstimate, simulate_decode
from pangu.sim.memory import MemoryBreakdown
from pangu.sim.pipeline import bubble_fraction
from pangu.sim.plan import FP32, MIXED_BF16, W8A8, DecodeWorkload, Infeasible, Plan, Precision, TrainWorkload
from pangu.sim.search import MoEShapeSpace, PlanSpace, SearchResult, best_decode, search_decode_shapes, search_training
from pangu.sim.shapes import GQA, MLA, SHAPES, ModelShape, from_config, get_shape, ultra_moe_718b
from pangu.sim.training import SimOptions, TrainEstimate, simulate_training

__all__ = [
    "FP32", "GQA", "MIXED_BF16", "MLA", "SHAPES", "W8A8", "DecodeEstimate", "DecodeWorkload",
    "Infeasible", "MemoryBreakdown", "ModelShape", "MoEShapeSpace", "Plan", "PlanSpace", "Precision", "SearchResult",
    "SimOptions", "TrainEstimate", "TrainWorkload", "best_decode", "bubble_fraction", "from_config", "get_shape",
    "search_decode_shapes", "search_training", "simulate_decode", "simulate_training", "ultra_moe_718b",
]
