"""Data parallel: the batch split over one mesh axis, parameters whole there (their gradients all-reduced).

The default layout of every input is ``S(0)`` on that axis; parameters keep whatever they have on the
other axes (and whatever ZeRO made of this one). Inputs laid out by hand (``input_sbp``, ``hints.py``)
are applied after and win.
"""

from __future__ import annotations

from shardflow.placement.sbp import B, S
from shardflow.plan import ParallelPlan, PlanError


def apply_dp(plan: ParallelPlan, axis: str) -> ParallelPlan:
    """``plan`` with the batch split over mesh axis ``axis``; its parameters must be stored whole there."""
    a = plan.mesh.names.index(axis)
    for name, p in plan.params.items():
        if p.sbp[a] != B:
            raise PlanError(f"data parallel over {axis!r}: parameter {name!r} is already laid out {p.sbp} there")
    return plan.replace(inputs=tuple(s[:a] + (S(0),) + s[a + 1 :] for s in plan.inputs))
