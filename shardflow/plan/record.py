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

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import NdSbp, format_sbp, grad_sbp, is_placement
from shardflow.plan.check import PlanError, check

STRATEGIES = ("dp", "tp", "hybrid")
SCHEDULES = ("gpipe", "1f1b")


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

    def __post_init__(self) -> None:
        if self.device_type not in ("cpu", "cuda"):
            raise PlanError(f"mesh device_type {self.device_type!r}: 'cpu' or 'cuda'")
        shape = _ints(self.shape, "mesh shape", positive=True)
        names = _strs(self.names, "mesh names")
        ranks = _ints(self.ranks, "mesh ranks")
        if not shape or len(names) != len(shape) or len(set(names)) != len(names):
            raise PlanError(f"mesh names {list(names)} must be {len(shape)} distinct strings, one per axis of {shape}")
        if len(ranks) != math.prod(shape) or len(set(ranks)) != len(ranks) or min(ranks) < 0:
            raise PlanError(
                f"mesh ranks {list(ranks)}: {math.prod(shape)} distinct non-negative ranks for shape {shape}"
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "ranks", ranks)

    @classmethod
    def of(cls, mesh: Mesh) -> MeshSpec:
        return cls(mesh.device_type, tuple(mesh.shape), tuple(mesh.names), tuple(mesh.ranks))

    def build(self, virtual: bool = False) -> Mesh:
        """The mesh (collective), or with ``virtual`` its description only (no process groups)."""
        return Mesh(self.device_type, self.shape, names=self.names, ranks=self.ranks, virtual=virtual)

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

    def __post_init__(self) -> None:
        for kind in ("sbp", "compute", "grad", "optim"):
            object.__setattr__(self, kind, _sbp(getattr(self, kind), kind))

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


TABLE_PLACEMENTS = ("row", "column", "table", "replicated")


@dataclass(frozen=True)
class TablePlan:
    """Where a sparse embedding table lives over the mesh's data-parallel axis (``sf.Embeddings``): split by
    rows (``S(0)``), by columns (``S(1)``), whole on the rank at index ``owner`` of that axis, or whole on
    every rank (``B``); ``rows`` x ``dim`` its logical shape."""

    placement: str
    rows: int
    dim: int
    owner: int | None = None

    def __post_init__(self) -> None:
        if self.placement not in TABLE_PLACEMENTS:
            raise PlanError(f"table placement {self.placement!r}: one of {TABLE_PLACEMENTS}")
        _ints((self.rows, self.dim), "table rows and dim", positive=True)
        if (self.placement == "table") != (self.owner is not None):
            raise PlanError(
                f"table placement {self.placement!r} with owner {self.owner!r}: a 'table' placement names the "
                "index of its rank on the data-parallel axis (owner), the others none"
            )
        if self.owner is not None:
            _ints((self.owner,), "table owner")

    def __str__(self) -> str:
        layout = {"row": "S(0)", "column": "S(1)", "replicated": "B"}.get(self.placement, f"on dp rank {self.owner}")
        return f"{self.placement:<10} {self.rows} x {self.dim}  {layout}"


@dataclass(frozen=True)
class PipelinePlan:
    """The cut and schedule: stage ``s`` starts at module ``split_points[s - 1]``."""

    axis: str
    split_points: tuple[str, ...]
    micro_batches: int
    schedule: str
    split_backward: bool = True
    stage_meshes: tuple[MeshSpec, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.axis, str):
            raise PlanError(f"pipeline.axis {self.axis!r}: the name of a mesh axis")
        object.__setattr__(self, "split_points", _strs(self.split_points, "pipeline.split_points"))
        _ints((self.micro_batches,), "pipeline.micro_batches", positive=True)
        if self.schedule not in SCHEDULES:
            raise PlanError(f"pipeline.schedule {self.schedule!r}: one of {SCHEDULES}")
        _bool(self.split_backward, "pipeline.split_backward")
        if self.stage_meshes is not None:
            meshes = tuple(self.stage_meshes) if isinstance(self.stage_meshes, (list, tuple)) else ()
            if not meshes or not all(isinstance(x, MeshSpec) for x in meshes):
                raise PlanError(f"pipeline.stage_meshes {self.stage_meshes!r}: one mesh description per stage")
            object.__setattr__(self, "stage_meshes", meshes)


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

    def __post_init__(self) -> None:
        for name in ("static", "inductor", "cuda_graphs"):
            _bool(getattr(self, name), f"execution.{name}")
        if self.updates not in UPDATES:
            raise PlanError(f"execution.updates {self.updates!r}: choose one of {UPDATES}")
        if not (isinstance(self.arena, bool) or self.arena == "all"):
            raise PlanError(
                f"execution.arena {self.arena!r}: choose False, True (where it does not raise the peak) or 'all'"
            )


def default_updates(mesh: MeshSpec) -> str:
    """One device: one update after backward; CPUs: on the compute thread; GPUs: actor threads."""
    return "after" if mesh.size == 1 else ("loop" if mesh.device_type == "cpu" else "actors")


# the cost model's ``estimate(plan, model, inputs, optimizer, device)``, registered by the compiler's layer
ESTIMATORS: list[Callable[..., Any]] = []


@dataclass(frozen=True)
class ParallelPlan:
    """A parallel configuration as a value; ``sf.compile(model, plan=plan, ...)`` compiles it."""

    mesh: MeshSpec
    strategy: str
    """The strategy it was built from (``"dp"``, ``"tp"``, ``"hybrid"``): which axis is which."""
    params: Mapping[str, ParamPlan]
    """Parameter name (as ``model.named_parameters()``) -> ``ParamPlan``; under a pipeline the layouts are
    over each stage's ``(dp, tp)`` grid."""
    inputs: tuple[NdSbp, ...]
    """One layout per input of the step (none under a pipeline: it cuts inputs by rows)."""
    values: Mapping[str, NdSbp] = field(default_factory=Frozen)
    """Forced layouts of intermediate forward values, keyed ``module.path/op.k`` (the k-th ``op`` in that
    module's own forward, e.g. ``net.0/addmm.0``); the layout pass boxes the value to it."""
    pipeline: PipelinePlan | None = None
    recompute: tuple[str, ...] = ()
    """Modules whose activations are recomputed in backward."""
    bucket_bytes: int = 4 * 2**20
    """Gradient all-reduce bucket size (DDP uses 25 MiB on GPUs)."""
    max_grad_norm: float | None = None
    execution: Execution = field(default_factory=Execution)
    tables: Mapping[str, TablePlan] = field(default_factory=Frozen)
    """Sparse embedding tables (module name -> ``TablePlan``), kept out of ``params``: looked up and updated
    by all-to-all around the dense program (``shardflow/embedding/``)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise PlanError(f"strategy {self.strategy!r}: one of {STRATEGIES}")
        if not isinstance(self.params, Mapping) or not all(isinstance(p, ParamPlan) for p in self.params.values()):
            raise PlanError("params: a mapping from parameter names to ParamPlan")
        if not isinstance(self.values, Mapping):
            raise PlanError("values: a mapping from value keys (module.path/op.k) to layouts")
        object.__setattr__(self, "params", Frozen(self.params))
        if not isinstance(self.tables, Mapping) or not all(isinstance(t, TablePlan) for t in self.tables.values()):
            raise PlanError("tables: a mapping from embedding module names to TablePlan")
        object.__setattr__(self, "tables", Frozen(self.tables))
        object.__setattr__(self, "values", Frozen({str(k): _sbp(v, f"values[{k!r}]") for k, v in self.values.items()}))
        if isinstance(self.inputs, (str, bytes)) or not isinstance(self.inputs, (list, tuple)):
            raise PlanError(f"inputs {self.inputs!r}: a list with one layout per input")
        object.__setattr__(self, "inputs", tuple(_sbp(s, f"inputs[{i}]") for i, s in enumerate(self.inputs)))
        object.__setattr__(self, "recompute", _strs(self.recompute, "recompute"))
        _ints((self.bucket_bytes,), "bucket_bytes", positive=True)
        norm = self.max_grad_norm
        if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm > 0):
            raise PlanError(f"max_grad_norm {norm!r}: give a positive norm or None")
        object.__setattr__(self, "max_grad_norm", None if norm is None else float(norm))
        if not isinstance(self.execution, Execution) or not isinstance(self.mesh, MeshSpec):
            raise PlanError("execution and mesh must be an Execution and a MeshSpec")
        check(self)

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

    def estimate(
        self, model: Any, example_inputs: Any, optimizer: Any = None, device: Any = None
    ) -> Any:  # graph.estimate.Estimate
        """This plan priced without running: ``peak_bytes`` per rank and ``step_seconds`` on ``device``'s
        profile (a shipped name such as ``"h100"``, a profile's path, or None: this machine's calibrated
        one), on fake tensors, with no process group; its mesh may be larger than the job. The work is the
        compiler's (``graph/estimate.py``, which registers itself here: a plan sits below the compiler)."""
        if not ESTIMATORS:
            raise RuntimeError("plan.estimate needs the compiler: import shardflow (it registers graph/estimate.py)")
        if self.tables:
            raise NotImplementedError(
                "plan.estimate prices dense plans; the sparse tables' all-to-alls are not priced yet "
                "(pm.explain() gives their expected bytes per step)"
            )
        return ESTIMATORS[0](self, model, example_inputs, optimizer, device)

    def replace(self, **changes: Any) -> ParallelPlan:
        """A copy with ``changes`` (fields of the plan or of its ``execution``), checked."""
        mine = {f.name for f in dataclasses.fields(self)}
        run_fields = {f.name for f in dataclasses.fields(Execution)}
        unknown = sorted(set(changes) - mine - run_fields)
        if unknown:
            hint = (
                " (ZeRO is the parameters' layouts: graph/transforms/zero.py's apply_zero)" if "zero" in unknown else ""
            )
            raise PlanError(f"a plan has no entry {unknown}; its entries: {sorted(mine | run_fields)}{hint}")
        run = {k: changes.pop(k) for k in list(changes) if k in run_fields}
        if run:
            changes["execution"] = dataclasses.replace(changes.get("execution", self.execution), **run)
        return dataclasses.replace(self, **changes)

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
        if self.inputs:
            lines.append("inputs: " + ", ".join(format_sbp(s) for s in self.inputs))
        width = max((len(n) for n in [*self.params, *self.values, *self.tables]), default=4)
        if self.params:
            grid = " (over each stage's (dp, tp) grid)" if self.pipeline is not None else ""
            lines.append(f"parameters{grid}:")
            lines += [f"  {n:<{width}}  {p}" for n, p in self.params.items()]
        if self.tables:
            lines.append("sparse tables (over the data-parallel axis):")
            lines += [f"  {n:<{width}}  {t}" for n, t in self.tables.items()]
        if self.values:
            lines.append("values (forced):")
            lines += [f"  {k:<{width}}  {format_sbp(s)}" for k, s in self.values.items()]
        return "\n".join(lines)


def _sbp(value: Any, where: str) -> NdSbp:
    if isinstance(value, (list, tuple)) and all(is_placement(p) for p in value):
        return tuple(value)
    raise PlanError(f"{where} {value!r}: a tuple of placements (sf.S(i), sf.B, sf.P, sf.Blocked), one per mesh axis")


def _ints(value: Any, where: str, positive: bool = False) -> tuple[int, ...]:
    items = tuple(value) if isinstance(value, (list, tuple)) else None
    if items is None or any(isinstance(v, bool) or not isinstance(v, int) or (positive and v < 1) for v in items):
        raise PlanError(f"{where} {value!r}: {'positive ' if positive else ''}integers")
    return items


def _strs(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise PlanError(f"{where} {value!r}: a list of strings")


def _bool(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise PlanError(f"{where} {value!r}: true or false")
