"""``ParallelPlan``: every decision of a parallel configuration as one frozen value.

A plan names the mesh (a description: building or reading a plan makes no process group), each parameter's
layouts, the inputs' layouts, forced layouts of intermediate values, the pipeline, the recompute set and the
execution options. Strategies write it (``graph/transforms/``), the compiler reads it, JSON holds it
(``plan/schema.py``), and later a cost model prices it and a search chooses one. Like torchtitan's
``parallelize`` functions or Alpa's sharding specs, but as data: equal and hashable by value, so plans can
be compared, cached and saved.

ZeRO has no field of its own: a parameter's four layouts say it. ``sbp`` is how it is stored, ``compute``
what ops see (ZeRO-3 stores ``S`` on the data-parallel axis and gathers to ``B`` for each use), ``grad``
its gradient after synchronisation (ZeRO-2: split there) and ``optim`` the piece the optimizer steps and
its state's layout (ZeRO-1: split there).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, Blocked, NdSbp, P, format_sbp, grad_sbp, is_split


class PlanError(ValueError):
    """A plan that cannot be compiled as written: the message names the entry and what to change."""


class Frozen(Mapping[str, Any]):
    """An immutable, hashable mapping that keeps its order for printing and compares like a dict."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        self._items: dict[str, Any] = dict(items or {})

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"Frozen({self._items!r})"


@dataclass(frozen=True)
class MeshSpec:
    """What a mesh is, without its process groups: ``build()`` makes the ``sf.Mesh`` (collective)."""

    device_type: str
    shape: tuple[int, ...]
    names: tuple[str, ...]
    ranks: tuple[int, ...]

    @classmethod
    def of(cls, mesh: Mesh) -> MeshSpec:
        return cls(mesh.device_type, tuple(mesh.shape), tuple(mesh.names), tuple(mesh.ranks))

    def build(self) -> Mesh:
        return Mesh(self.device_type, self.shape, names=self.names, ranks=self.ranks)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def axis(self, name: str | None) -> int | None:
        return None if name is None else self.names.index(name)

    def __str__(self) -> str:
        axes = ", ".join(f"{n}={s}" for n, s in zip(self.names, self.shape))
        default = self.ranks == tuple(range(self.size))
        return f"{self.device_type} mesh ({axes})" + ("" if default else f" on ranks {list(self.ranks)}")


@dataclass(frozen=True)
class ParamPlan:
    """One parameter's layouts (see the module docstring): stored, computed with, gradient, optimizer."""

    sbp: NdSbp
    compute: NdSbp
    grad: NdSbp
    optim: NdSbp

    @classmethod
    def plain(cls, sbp: NdSbp) -> ParamPlan:
        """Stored and computed as ``sbp``; gradient and optimizer state in its gradient layout."""
        return cls(sbp, sbp, grad_sbp(sbp), grad_sbp(sbp))

    def __str__(self) -> str:
        out = format_sbp(self.sbp)
        extra = [
            f"{k} {format_sbp(v)}"
            for k, v, default in (
                ("compute", self.compute, self.sbp),
                ("grad", self.grad, grad_sbp(self.compute)),
                ("optim", self.optim, self.grad),
            )
            if v != default
        ]
        return out + (f"  ({'; '.join(extra)})" if extra else "")


@dataclass(frozen=True)
class PipelinePlan:
    """The cut and schedule: stage ``s`` starts at module ``split_points[s - 1]``."""

    axis: str
    split_points: tuple[str, ...]
    micro_batches: int
    schedule: str
    split_backward: bool = True
    stage_meshes: tuple[MeshSpec, ...] | None = None


UPDATES = ("actors", "loop", "inline", "after")


@dataclass(frozen=True)
class Execution:
    """How the programs run: none of it changes the result beyond float rounding order."""

    static: bool = True
    """Lowered per-rank programs (False: op by op on GlobalTensors, any input shape without lowering)."""
    updates: str = "loop"
    """Where each gradient unit's optimizer update runs (runtime/updates.py): one of ``UPDATES``."""
    arena: bool | str = False
    """Static placement of temporaries: False, True (where it does not raise the peak) or ``"all"``."""
    inductor: bool = False
    """Programs compiled by ``torch.compile``."""
    cuda_graphs: bool = False
    """One GPU: each step captured as a CUDA graph and replayed."""


def default_updates(mesh: MeshSpec) -> str:
    """One device: one update after backward; CPUs: on the compute thread; GPUs: actor threads."""
    return "after" if mesh.size == 1 else ("loop" if mesh.device_type == "cpu" else "actors")


@dataclass(frozen=True)
class ParallelPlan:
    """A parallel configuration as a value; ``sf.compile(model, plan=plan, ...)`` compiles it."""

    mesh: MeshSpec
    strategy: str
    """The strategy it was built from (``"dp"``, ``"tp"``, ``"hybrid"``): which axis is which."""
    params: Frozen
    """Parameter name (as ``model.named_parameters()``) -> ``ParamPlan``; under a pipeline the layouts are
    over each stage's ``(dp, tp)`` grid."""
    inputs: tuple[NdSbp, ...]
    """One layout per input of the step (none under a pipeline: it cuts inputs by rows)."""
    values: Frozen = field(default_factory=Frozen)
    """Forced layouts of intermediate forward values, keyed ``module.path/op.k`` (the k-th ``op`` in that
    module's own forward, e.g. ``net.0/addmm.0``); the layout pass boxes the value to it."""
    pipeline: PipelinePlan | None = None
    recompute: tuple[str, ...] = ()
    """Modules whose activations are recomputed in backward."""
    bucket_bytes: int = 4 * 2**20
    """Gradient all-reduce bucket size (DDP uses 25 MiB on GPUs)."""
    max_grad_norm: float | None = None
    execution: Execution = field(default_factory=Execution)

    # -- derived --------------------------------------------------------------------------------------
    @property
    def zero(self) -> int:
        """The ZeRO stage its layouts amount to (0: none)."""
        ps = list(self.params.values())
        if any(p.compute != p.sbp for p in ps):
            return 3
        if any(p.grad != grad_sbp(p.compute) for p in ps):
            return 2
        return 1 if any(p.optim != grad_sbp(p.sbp) for p in ps) else 0

    @property
    def zero_axis(self) -> int | None:
        """The axis ZeRO-3 parameters are stored split on and gathered over (None: no ZeRO-3)."""
        axes = {a for p in self.params.values() for a, (s, c) in enumerate(zip(p.sbp, p.compute)) if s != c}
        return axes.pop() if len(axes) == 1 else None

    def layouts(self) -> dict[str, NdSbp]:
        """Each parameter's stored layout."""
        return {n: p.sbp for n, p in self.params.items()}

    def to_json(self) -> str:
        from shardflow.plan.schema import dump

        return dump(self)

    @classmethod
    def from_json(cls, text: str) -> ParallelPlan:
        from shardflow.plan.schema import load

        return load(text)

    def replace(self, **changes: Any) -> ParallelPlan:
        """A copy with ``changes`` (fields of the plan or of its ``execution``), checked."""
        import dataclasses

        run = {k: changes.pop(k) for k in list(changes) if k in {f.name for f in dataclasses.fields(Execution)}}
        plan = dataclasses.replace(self, **changes)
        if run:
            plan = dataclasses.replace(plan, execution=dataclasses.replace(plan.execution, **run))
        check(plan)
        return plan

    def explain(self) -> str:
        """The plan for people: mesh, strategy, ZeRO, pipeline, options, then every layout."""
        e = self.execution
        lines = [f"ParallelPlan: strategy {self.strategy!r} on a {self.mesh}"]
        if self.zero:
            lines.append(f"ZeRO stage {self.zero} (from the layouts below)")
        if self.pipeline is not None:
            p = self.pipeline
            where = f"stage meshes {[str(m) for m in p.stage_meshes]}" if p.stage_meshes else f"axis {p.axis!r}"
            lines.append(
                f"pipeline over {where}: {p.schedule}, {p.micro_batches} micro-batch(es), stages begin at "
                f"{list(p.split_points)}" + ("" if p.split_backward else ", last backward in one pass")
            )
        if self.recompute:
            lines.append(f"recomputed in backward: {', '.join(self.recompute)}")
        options = [f"{'static' if e.static else 'eager'} program", f"updates {e.updates!r}"]
        options += [f"buckets of {self.bucket_bytes} bytes"]
        options += [f"arena {e.arena!r}"] * bool(e.arena) + ["inductor"] * e.inductor + ["CUDA graphs"] * e.cuda_graphs
        if self.max_grad_norm is not None:
            options.append(f"gradients clipped to norm {self.max_grad_norm}")
        lines.append("execution: " + ", ".join(options))
        lines.append("inputs: " + ", ".join(format_sbp(s) for s in self.inputs))
        width = max((len(n) for n in [*self.params, *self.values]), default=4)
        if self.params:
            lines.append("parameters:")
            lines += [f"  {n:<{width}}  {p}" for n, p in self.params.items()]
        if self.values:
            lines.append("values (forced):")
            lines += [f"  {k:<{width}}  {format_sbp(s)}" for k, s in self.values.items()]
        return "\n".join(lines)


def check(plan: ParallelPlan) -> None:
    """Raise ``PlanError`` for entries no compiler could run, whatever the model: layouts of the wrong
    length, partial parameters, unknown options. Checks against the model's shapes: ``check_model``."""
    mesh = plan.mesh
    grid = 2 if plan.pipeline is not None else mesh.ndim  # a pipeline's layouts are over (dp, tp) per stage
    where = "each stage's (dp, tp) grid" if plan.pipeline is not None else f"the mesh {mesh.names}"
    for name, p in plan.params.items():
        for kind in ("sbp", "compute", "grad", "optim"):
            sbp = getattr(p, kind)
            if len(sbp) != grid:
                raise PlanError(
                    f"parameter {name!r}: {kind} {format_sbp(sbp)} has {len(sbp)} entries; {where} has {grid} axes"
                )
            if P in sbp:
                raise PlanError(f"parameter {name!r}: {kind} {format_sbp(sbp)} is partial; use B or S(i)")
        _check_entry(name, p)
    for i, sbp in enumerate(plan.inputs):
        if len(sbp) != mesh.ndim:
            raise PlanError(f"input {i}: {format_sbp(sbp)} has {len(sbp)} entries; the mesh has {mesh.ndim} axes")
    for key, sbp in plan.values.items():
        if len(sbp) != mesh.ndim:
            raise PlanError(f"value {key!r}: {format_sbp(sbp)} has {len(sbp)} entries; the mesh has {mesh.ndim} axes")
    e = plan.execution
    if e.updates not in UPDATES:
        raise PlanError(f"execution.updates {e.updates!r}: choose one of {UPDATES}")
    if e.arena not in (False, True, "all"):
        raise PlanError(f"execution.arena {e.arena!r}: choose False, True (where it does not raise the peak) or 'all'")
    if e.cuda_graphs and not e.static:
        raise PlanError("cuda_graphs replay the static program; set static=True or cuda_graphs=False")
    if not isinstance(plan.bucket_bytes, int) or isinstance(plan.bucket_bytes, bool) or plan.bucket_bytes < 1:
        raise PlanError(f"bucket_bytes {plan.bucket_bytes!r}: give a positive number of bytes")
    if plan.max_grad_norm is not None and not plan.max_grad_norm > 0:
        raise PlanError(f"max_grad_norm {plan.max_grad_norm!r}: give a positive norm or None")
    if plan.zero == 3 and plan.zero_axis is None:
        raise PlanError("parameters are gathered for compute over more than one axis; ZeRO-3 gathers over one")
    if plan.pipeline is not None:
        p = plan.pipeline
        if p.stage_meshes is None and p.axis not in mesh.names:
            raise PlanError(f"pipeline axis {p.axis!r} is not an axis of the mesh {mesh.names}")
        unsupported = {
            "values": bool(plan.values), "recompute": bool(plan.recompute), "execution.static": not e.static,
            "execution.inductor": e.inductor, "execution.cuda_graphs": e.cuda_graphs,
            "execution.updates": e.updates != "after",
        }  # fmt: skip
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise PlanError(
                f"{', '.join(bad)} cannot be combined with a pipeline yet (its stages run lowered programs and "
                "update once their last backward is over): leave them at values=(), recompute=(), static=True, "
                "inductor=False, cuda_graphs=False, updates='after'"
            )
        dp_split = [n for n, q in plan.params.items() if q.sbp[0] != B or q != ParamPlan.plain(q.sbp)]
        if dp_split:
            raise PlanError(
                f"parameter {dp_split[0]!r}: a pipeline stage keeps its parameters whole over its data-parallel "
                "ranks (no ZeRO with a pipeline yet): give it B on the stage's dp axis"
            )


def _check_entry(name: str, p: ParamPlan) -> None:
    """The four layouts of one parameter must be one of the combinations the runtime runs: computed as
    stored or gathered from splits (ZeRO-3); gradient reduced to the computed layout, or to the stored split
    (ZeRO-3), or to the optimizer's piece (ZeRO-2); optimizer on the whole local or on a piece split where
    the parameter is replicated (ZeRO-1/2)."""

    def fail(what: str) -> PlanError:
        return PlanError(f"parameter {name!r} ({p}): {what}")

    if any(s != c and not (is_split(s) and c == B) for s, c in zip(p.sbp, p.compute)):
        raise fail("compute may differ from sbp only where sbp splits and compute is B (ZeRO-3's gather)")
    gathered = p.compute != p.sbp
    whole = grad_sbp(p.sbp)
    if gathered:
        if (p.grad, p.optim) != (whole, whole):
            raise fail("a parameter stored split and gathered for compute keeps grad and optim in its stored layout")
        return
    if p.optim != whole and any(o != s and not (s == B and is_split(o)) for s, o in zip(p.sbp, p.optim)):
        raise fail("optim may differ from sbp only by splitting an axis where sbp is B (ZeRO-1/2's piece)")
    if p.grad not in (whole, p.optim):
        raise fail("grad must be sbp's gradient layout, or the optimizer's piece (ZeRO-2)")


def check_model(plan: ParallelPlan, shapes: Mapping[str, tuple[int, ...]], n_inputs: int) -> None:
    """Raise ``PlanError`` unless the plan names exactly the model's parameters (``shapes``) and inputs, and
    every split fits its tensor."""
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
    for name, p in plan.params.items():
        shape = shapes[name]
        for kind in ("sbp", "compute", "grad", "optim"):
            for q in getattr(p, kind):
                if is_split(q) and q.dim >= len(shape):  # type: ignore[union-attr]
                    raise PlanError(
                        f"parameter {name!r} of shape {tuple(shape)}: {kind} {format_sbp(getattr(p, kind))} splits "
                        f"dim {q.dim}, but it has {len(shape)} dims: split a dim < {len(shape)}"  # type: ignore[union-attr]
                    )
                if isinstance(q, Blocked) and shape[q.dim] % q.blocks:
                    raise PlanError(
                        f"parameter {name!r} of shape {tuple(shape)}: {q} needs dim {q.dim} to hold {q.blocks} "
                        "equal blocks"
                    )
