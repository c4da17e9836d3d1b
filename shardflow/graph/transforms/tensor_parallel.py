"""Tensor parallel: Megatron pairs found on the captured graph, split over one mesh axis.

A column-parallel linear (weight ``S(0)``, bias ``S(0)``; a fused one ``Blocked(0, k)``) feeds its row-
parallel partner (weight ``S(1)``) only through shape ops and element-wise activations, so each pair costs
one all-reduce (graph/strategy.py finds them). Parameters outside pairs stay replicated on the axis.
"""

from __future__ import annotations

from shardflow.graph.capture import Captured
from shardflow.graph.strategy import megatron_placements
from shardflow.plan import ParallelPlan, ParamPlan


def apply_tp(plan: ParallelPlan, captured: Captured, axis: str, grid_axis: int | None = None) -> ParallelPlan:
    """``plan`` with Megatron layouts on mesh axis ``axis`` (``grid_axis``: the index in the layouts, when
    they are not over the plan's mesh, as a pipeline stage's ``(dp, tp)`` grid)."""
    a = plan.mesh.names.index(axis) if grid_axis is None else grid_axis
    params = dict(plan.params)
    for name, placement in megatron_placements(captured, list(params)).items():
        sbp = params[name].sbp
        params[name] = ParamPlan.plain(sbp[:a] + (placement,) + sbp[a + 1 :])
    return plan.replace(params=type(plan.params)(params))
