"""Layouts given by hand: ``hints={glob: sbp}`` for parameters and ``input_sbp`` for inputs; they win over
what the strategy chose, and a glob that matches nothing is an error (a misspelt one must not pass)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

from shardflow.placement.sbp import P, Placement, format_sbp, is_placement, normalize_sbp
from shardflow.plan import ParallelPlan, ParamPlan, PlanError, layout_misfit


def apply_hints(
    plan: ParallelPlan,
    hints: Mapping[str, Placement | Sequence[Placement]],
    shapes: Mapping[str, tuple[int, ...]],
) -> ParallelPlan:
    """``plan`` with each parameter matched by a glob (``fnmatch`` on its name) laid out as the hint says."""
    params = dict(plan.params)
    for glob, sbp in hints.items():
        matched = [n for n in shapes if fnmatch.fnmatch(n, glob)]
        if not matched:
            raise PlanError(
                f"hint {glob!r} matches no parameter; parameters are named like {list(shapes)[:4]} "
                f"(model.named_parameters())"
            )
        nd = normalize_sbp(sbp, plan.mesh.ndim)
        for name in matched:
            if P in nd:
                raise PlanError(
                    f"hint {glob!r}: a parameter cannot be partial ({format_sbp(nd)} for {name!r}); use B or S(i)"
                )
            misfit = layout_misfit(name, shapes[name], nd)
            if misfit is not None:
                raise PlanError(f"hint {glob!r}: sbp {misfit}")
            if params[name] != ParamPlan.plain(params[name].sbp):
                raise PlanError(f"hint {glob!r}: parameter {name!r} already has ZeRO layouts: apply hints first")
            params[name] = ParamPlan.plain(nd)
    return plan.replace(params=params)


def apply_input_sbp(plan: ParallelPlan, input_sbp: Any, n: int) -> ParallelPlan:
    """``plan`` with its ``n`` inputs laid out by ``input_sbp``: one layout (a placement or an nd-SBP) for
    every input, or a sequence with one per input."""
    return plan.replace(inputs=tuple(input_layouts(input_sbp, plan.mesh.ndim, n)))


def input_layouts(input_sbp: Any, ndim: int, n: int) -> list[tuple[Placement, ...]]:
    """One nd-SBP per input from ``input_sbp`` (see ``apply_input_sbp``) on a mesh of ``ndim`` axes."""
    if is_placement(input_sbp) or (
        isinstance(input_sbp, (tuple, list)) and len(input_sbp) == ndim and all(map(is_placement, input_sbp))
    ):
        return [normalize_sbp(input_sbp, ndim)] * n
    if isinstance(input_sbp, (tuple, list)) and len(input_sbp) == n:
        return [normalize_sbp(s, ndim) for s in input_sbp]
    raise PlanError(
        f"input_sbp {input_sbp!r} is neither one layout for every input nor one layout per input "
        f"({n} inputs on a {ndim}-d mesh)"
    )
