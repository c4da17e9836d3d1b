"""What makes a plan runnable, checked where a plan is made (``ParallelPlan.__post_init__``) and, against a
model's parameters and modules, where it is compiled (``check_model``).

Each entry's own type is checked by its record (plan/record.py); here the entries are checked together:
layouts of the right length and kind for the mesh, the four layouts of a parameter in a combination the
runtime runs (ZeRO 0-3), a pipeline whose cut fits its stages and whose options its stages have. Every error
is a ``PlanError`` that names the entry and what to change.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from shardflow.placement.sbp import B, Blocked, NdSbp, P, S, format_sbp, grad_sbp, is_split
from shardflow.placement.shard import unflatten

if TYPE_CHECKING:
    from shardflow.plan.record import ParallelPlan, ParamPlan


class PlanError(ValueError):
    """A plan that cannot be compiled as written: the message names the entry and what to change."""


def check(plan: ParallelPlan) -> None:
    """Raise ``PlanError`` for entries no compiler could run, whatever the model."""
    mesh, e, pipe = plan.mesh, plan.execution, plan.pipeline
    grid = 2 if pipe is not None else mesh.ndim  # a pipeline's layouts are over (dp, tp) per stage
    where = "each stage's (dp, tp) grid" if pipe is not None else f"the mesh {mesh.names}"
    for name, p in plan.params.items():
        for kind in ("sbp", "compute", "grad", "optim"):
            sbp = getattr(p, kind)
            if len(sbp) != grid:
                raise PlanError(
                    f"parameter {name!r}: {kind} {format_sbp(sbp)} has {len(sbp)} entries; {where} has {grid} axes"
                )
            if P in sbp:
                raise PlanError(f"parameter {name!r}: {kind} {format_sbp(sbp)} is partial; use B or S(i)")
            if any(isinstance(q, Blocked) for q in sbp) and unflatten((0,) * 8, sbp) is None:
                raise PlanError(f"parameter {name!r}: {kind} {format_sbp(sbp)} splits one dim plainly and in blocks")
        _check_entry(name, p)
    for i, sbp in enumerate(plan.inputs):
        if len(sbp) != mesh.ndim:
            raise PlanError(f"input {i}: {format_sbp(sbp)} has {len(sbp)} entries; the mesh has {mesh.ndim} axes")
    for key, sbp in plan.values.items():
        if len(sbp) != mesh.ndim:
            raise PlanError(f"value {key!r}: {format_sbp(sbp)} has {len(sbp)} entries; the mesh has {mesh.ndim} axes")
    if e.cuda_graphs and not e.static:
        raise PlanError("cuda_graphs replay the static program; set static=True or cuda_graphs=False")
    eager = [k for k, v in (("values", bool(plan.values)), ("arena", e.arena), ("inductor", e.inductor)) if v]
    if not e.static and eager:
        raise PlanError(f"{eager} shape the lowered program, which static=False does not run: leave them off")
    if plan.zero == 3 and plan.zero_axis is None:
        raise PlanError("parameters are gathered for compute over more than one axis; ZeRO-3 gathers over one")
    if pipe is not None:
        _check_pipeline(plan)


def _check_pipeline(plan: ParallelPlan) -> None:
    pipe, mesh, e = plan.pipeline, plan.mesh, plan.execution
    assert pipe is not None
    if pipe.stage_meshes is None:
        if pipe.axis not in mesh.names:
            raise PlanError(f"pipeline axis {pipe.axis!r} is not an axis of the mesh {mesh.names}")
        stages = mesh.shape[mesh.names.index(pipe.axis)]
        where = f"mesh axis {pipe.axis!r} has {stages} ranks"
    else:
        stages = len(pipe.stage_meshes)
        where = f"{stages} stage meshes were given"
    points = list(pipe.split_points)
    if len(points) != stages - 1:
        raise PlanError(
            f"{len(points)} split points {points} make {len(points) + 1} stages, but {where}: "
            f"give {stages - 1} split points"
        )
    unsupported = {
        "values": bool(plan.values), "recompute": bool(plan.recompute), "execution.static": not e.static,
        "execution.inductor": e.inductor, "execution.cuda_graphs": e.cuda_graphs,
        "execution.updates": e.updates != "after", "execution.arena": e.arena and plan.strategy == "dp",
    }  # fmt: skip
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise PlanError(
            f"{', '.join(bad)} cannot be combined with this pipeline (its stages run lowered programs, update once "
            "their last backward is over, and place temporaries only in tensor-parallel stages): leave "
            f"{'them' if len(bad) > 1 else 'it'} at the default"
        )
    for name, q in plan.params.items():
        if q.sbp[0] != B or q != type(q).plain(q.sbp):
            raise PlanError(
                f"parameter {name!r}: a pipeline stage keeps its parameters whole over its data-parallel ranks "
                "(no ZeRO with a pipeline yet): give it B on the stage's dp axis, in all four layouts"
            )
        if plan.strategy == "dp" and q.sbp[1] != B:
            raise PlanError(
                f"parameter {name!r}: {format_sbp(q.sbp)} splits over tp, but strategy 'dp' gives the stages no tp "
                "axis: use strategy 'tp' (or 'hybrid') with a 'tp' axis, or B"
            )


def _check_entry(name: str, p: ParamPlan) -> None:
    """The four layouts of one parameter must be one of the combinations the runtime runs: computed as
    stored or gathered from plain splits (ZeRO-3); gradient reduced to the computed layout, or to the stored
    split (ZeRO-3), or to the optimizer's piece (ZeRO-2); optimizer on the whole local or on a piece split
    where the parameter is replicated (ZeRO-1/2)."""

    def fail(what: str) -> PlanError:
        return PlanError(f"parameter {name!r} ({p}): {what}")

    if any(s != c and not (isinstance(s, S) and c == B) for s, c in zip(p.sbp, p.compute)):
        raise fail("compute may differ from sbp only where sbp is S(i) and compute is B (ZeRO-3's gather)")
    whole = grad_sbp(p.sbp)
    if p.compute != p.sbp:
        if (p.grad, p.optim) != (whole, whole):
            raise fail("a parameter stored split and gathered for compute keeps grad and optim in its stored layout")
        return
    if p.optim != whole and any(o != s and not (s == B and is_split(o)) for s, o in zip(p.sbp, p.optim)):
        raise fail("optim may differ from sbp only by splitting an axis where sbp is B (ZeRO-1/2's piece)")
    if p.grad not in (whole, p.optim):
        raise fail("grad must be sbp's gradient layout, or the optimizer's piece (ZeRO-2)")


def check_model(
    plan: ParallelPlan, shapes: Mapping[str, tuple[int, ...]], n_inputs: int, modules: Collection[str] = ()
) -> None:
    """Raise ``PlanError`` unless the plan names exactly the model's parameters (``shapes``), its inputs and
    (``modules``: the names in ``model.named_modules()``) modules to recompute, and every split fits its
    tensor."""
    missing = [n for n in shapes if n not in plan.params]
    extra = [n for n in plan.params if n not in shapes]
    if missing or extra:
        raise PlanError(
            f"the plan's parameters do not match the model's: missing {missing[:4]}, unknown {extra[:4]} "
            "(names as in model.named_parameters())"
        )
    if plan.pipeline is not None and plan.inputs:
        raise PlanError("a pipeline cuts its inputs into micro-batches by rows: its plan lays out no inputs ([])")
    if plan.pipeline is None and len(plan.inputs) != n_inputs:
        raise PlanError(f"the plan lays out {len(plan.inputs)} inputs; the model was given {n_inputs}")
    unknown = [m for m in plan.recompute if modules and m not in modules]
    if unknown:
        raise PlanError(f"recompute names {unknown}, not modules of the model (model.named_modules())")
    for name, p in plan.params.items():
        for kind in ("sbp", "compute", "grad", "optim"):
            misfit = layout_misfit(name, shapes[name], getattr(p, kind))
            if misfit is not None:
                raise PlanError(f"{kind} {misfit}")


def layout_misfit(name: str, shape: tuple[int, ...], sbp: NdSbp) -> str | None:
    """Why layout ``sbp`` cannot lay out parameter ``name`` of ``shape`` (a split dim it does not have, blocks
    that do not divide its dim), or None when it fits."""
    for q in sbp:
        if is_split(q) and q.dim >= len(shape):  # type: ignore[union-attr]
            return (
                f"{format_sbp(sbp)} does not fit parameter {name!r} of shape {tuple(shape)}: it splits dim "
                f"{q.dim}, but a split dim must be < {len(shape)}"  # type: ignore[union-attr]
            )
        if isinstance(q, Blocked) and shape[q.dim] % q.blocks:
            return (
                f"{q} does not fit parameter {name!r} of shape {tuple(shape)}: dim {q.dim} does not hold "
                f"{q.blocks} equal blocks"
            )
    return None
