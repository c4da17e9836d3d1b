"""ZeRO stage k as layouts over the data-parallel axis, and the one place that decides them.

Stage 1 gives the optimizer a piece of each replicated parameter (``optim`` split on the axis, on the first
dim of size > 1 that no other axis splits, so the piece lies inside the local tensor); stage 2 also reduce-
scatters the gradient into that piece (``grad`` split too); stage 3 stores the parameter split (``sbp``)
and computes with it gathered (``compute``), on dim 0 or the first dim of size > 1 no ``Blocked`` layout
splits (``S(0)`` over ``Blocked(0, k)`` does not nest). The compiler and runtime read only these layouts.
"""

from __future__ import annotations

from collections.abc import Mapping

from shardflow.placement.sbp import B, Blocked, S, grad_sbp, is_split
from shardflow.plan import ParallelPlan, ParamPlan, PlanError


def apply_zero(plan: ParallelPlan, stage: int, axis: str, shapes: Mapping[str, tuple[int, ...]]) -> ParallelPlan:
    """``plan`` with ZeRO stage ``stage`` (0-3) over mesh axis ``axis``; ``shapes``: each parameter's shape."""
    if stage not in (0, 1, 2, 3):
        raise PlanError(f"zero={stage!r}: choose a ZeRO stage 0 (off), 1, 2 or 3")
    if stage == 0:
        return plan
    a = plan.mesh.names.index(axis)
    params = {}
    for name, p in plan.params.items():
        shape, sbp = shapes[name], p.sbp
        if p != ParamPlan.plain(sbp):
            raise PlanError(f"zero={stage}: parameter {name!r} already has ZeRO layouts ({p}); apply one stage")
        if stage == 3:
            blocked = {q.dim for q in sbp if isinstance(q, Blocked)}
            d = next((d for d in range(len(shape)) if d not in blocked and (shape[d] > 1 or not blocked)), None)
            if sbp[a] == B and d is not None:
                stored = sbp[:a] + (S(d),) + sbp[a + 1 :]
                p = ParamPlan(stored, sbp, grad_sbp(stored), grad_sbp(stored))
        elif sbp[a] == B and plan.mesh.shape[a] > 1:
            taken = {q.dim for q in sbp if is_split(q)}  # type: ignore[union-attr]
            d = next((d for d, n in enumerate(shape) if n > 1 and d not in taken), None)
            if d is not None:
                piece = sbp[:a] + (S(d),) + sbp[a + 1 :]
                p = ParamPlan(sbp, sbp, piece if stage == 2 else grad_sbp(sbp), piece)
        params[name] = p
    return plan.replace(params=params)
