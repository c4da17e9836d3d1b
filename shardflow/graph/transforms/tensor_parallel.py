"""Tensor parallel: Megatron pairs found on the captured graph, split over one mesh axis.

A column-parallel linear (weight ``S(0)``, bias ``S(0)``; a fused one ``Blocked(0, k)``) feeds its row-
parallel partner (weight ``S(1)``) only through shape ops and element-wise activations, so each pair costs
one all-reduce (graph/strategy.py finds them). Parameters outside pairs stay replicated on the axis. It
sets stored layouts, so it comes before ZeRO, which derives the other three from them.
"""

from __future__ import annotations

from shardflow.graph.capture import Captured
from shardflow.graph.strategy import megatron_placements
from shardflow.plan import ParallelPlan, ParamPlan, PlanError


def apply_tp(plan: ParallelPlan, captured: Captured, axis: str | int) -> ParallelPlan:
    """``plan`` with Megatron layouts on mesh axis ``axis`` (a name), or at index ``axis`` of the layouts
    (an int: layouts that are not over the plan's mesh, as a pipeline stage's ``(dp, tp)`` grid)."""
    a = plan.mesh.names.index(axis) if isinstance(axis, str) else axis
    # a pipeline's stages may differ in tp size: their views are then checked by shape alone
    ways = plan.mesh.shape[a] if isinstance(axis, str) else None
    params = dict(plan.params)
    for name, placement in megatron_placements(captured, list(params), ways).items():
        entry = params[name]
        if entry != ParamPlan.plain(entry.sbp):
            raise PlanError(f"tensor parallel: parameter {name!r} already has ZeRO layouts ({entry}): apply tp first")
        params[name] = ParamPlan.plain(entry.sbp[:a] + (placement,) + entry.sbp[a + 1 :])
    return plan.replace(params=params)
