"""``sf.compile`` and ``sf.plan``: a model's parallel plan built by the strategy transforms, then compiled.

``sf.plan(model, mesh, example_inputs, **keywords)`` composes the transforms of graph/transforms/ into a
``ParallelPlan`` without compiling or training; ``sf.compile`` with the same keywords compiles exactly that
plan (a ``ParallelModule``, or a ``PipelineModule`` with ``pipeline=``), and ``sf.compile(model,
plan=plan, example_inputs=..., optimizer=...)`` compiles a plan made elsewhere (read from JSON, edited, or
later chosen by a search). With ``memory_limit`` the compiled plan is refused before any step when some
rank's predicted peak exceeds it, the error pricing the changes that would fit; ``recompute="auto"``
searches the recompute set by that prediction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from shardflow.graph.estimate import Estimator
from shardflow.graph.flops import model_flops, skeleton
from shardflow.graph.lower import trace_step
from shardflow.graph.parallel_module import ParallelModule
from shardflow.graph.stage_program import StageProgram
from shardflow.graph.strategy import axes_for
from shardflow.graph.transforms import apply_zero, build_plan
from shardflow.graph.values import forced_nodes
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import Placement
from shardflow.plan import MeshSpec, ParallelPlan, PlanError, check_model
from shardflow.runtime.cuda_graph import check_graphable
from shardflow.runtime.host_memory import keep_host_memory
from shardflow.runtime.inductor import check_inductor
from shardflow.runtime.memory import MemoryReport, device_limit, fmt_bytes, parse_bytes
from shardflow.runtime.pipeline import Pipeline, PipelineModule
from shardflow.runtime.runner import OptimizerFactory, default_optimizer
from shardflow.runtime.stages import blocks
from shardflow.tensor.global_tensor import GlobalTensor

__all__ = ["MemoryPlanError", "ParallelModule", "check_graphable", "compile", "plan"]

_PRICING: list[bool] = []  # non-empty while a refusal compiles another plan to price it: no default limit of its own


@contextlib.contextmanager
def _pricing() -> Iterator[None]:
    _PRICING.append(True)
    try:
        yield
    finally:
        _PRICING.pop()


def plan(
    model: nn.Module,
    mesh: Mesh | MeshSpec,
    example_inputs: Sequence[Any],
    strategy: str = "dp",
    hints: Mapping[str, Placement | Sequence[Placement]] | None = None,
    input_sbp: Placement | Sequence[Any] | None = None,
    optimizer: OptimizerFactory | None = None,
    max_grad_norm: float | None = None,
    pipeline: Pipeline | None = None,
    zero: int = 0,
    memory_limit: int | str | None = None,
    recompute: bool | str | Sequence[str] = False,
    arena: bool | str = False,
    cuda_graphs: bool = False,
    inductor: bool = False,
    embeddings: Any = None,
) -> ParallelPlan:
    """The plan ``sf.compile`` builds with the same arguments, without compiling: no process group, no
    step; ``mesh`` may be an ``sf.Mesh`` or its description, a ``MeshSpec`` (no groups made at all).
    ``optimizer`` and ``memory_limit`` are taken so that any ``sf.compile`` call can become an ``sf.plan`` call;
    the plan does not hold them (the optimizer is given beside a plan, the limit checks a compiled one).
    ``recompute="auto"`` is the exception: it chooses by predicted memory, so it compiles (collective).
    ``embeddings``: the plan holds the tables' placements too (``shardflow/embedding/``)."""
    if embeddings is not None:
        keywords = _sparse_keywords(locals())
        return _sparse().plan(model, mesh, example_inputs, embeddings, keywords)[0]  # type: ignore[no-any-return]
    if recompute == "auto":
        mesh = mesh.build() if isinstance(mesh, MeshSpec) else mesh
        return compile(**locals()).plan  # type: ignore[no-any-return]
    _check_options(pipeline, hints, input_sbp, zero, recompute, cuda_graphs, inductor)
    return build_plan(
        model, mesh, example_inputs, strategy, hints, input_sbp, max_grad_norm, pipeline, zero, recompute,
        arena, cuda_graphs, inductor,
    )  # fmt: skip


# ``shardflow/embedding/compile.py`` registers its ``plan`` and ``compile`` here: sparse tables sit above the
# compiler (they run around its programs), so the compiler reaches them only through this hook.
SPARSE: list[Any] = []


def _sparse() -> Any:
    if not SPARSE:
        raise RuntimeError("embeddings= needs shardflow.embedding: import shardflow (it registers the sparse tables)")
    return SPARSE[0]


def _sparse_keywords(given: dict[str, Any]) -> dict[str, Any]:
    """The planning keywords of a ``compile``/``plan`` call, for the dense model of a sparse one."""
    names = ("strategy", "hints", "input_sbp", "max_grad_norm", "pipeline", "zero", "recompute", "arena")
    keywords = {k: given[k] for k in names}
    keywords |= {"cuda_graphs": given["cuda_graphs"], "inductor": given["inductor"]}
    if keywords["recompute"] == "auto":
        raise NotImplementedError("recompute='auto' with embeddings=: name the modules to recompute")
    return keywords


def _check_options(
    pipeline: Any, hints: Any, input_sbp: Any, zero: int, recompute: Any, cuda_graphs: bool, inductor: bool
) -> None:
    if pipeline is not None:
        if not isinstance(pipeline, Pipeline):
            raise TypeError(f"pipeline must be sf.Pipeline(...), got {type(pipeline).__name__}")
        unsupported = {"hints": bool(hints), "input_sbp": input_sbp is not None}
        unsupported |= {"zero": zero != 0, "recompute": bool(recompute), "cuda_graphs": cuda_graphs}
        unsupported |= {"inductor": inductor}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(
                f"with a pipeline, stages are data (and tensor) parallel over the other mesh axes; {', '.join(bad)} "
                "cannot be combined with pipeline= yet: leave them at their defaults"
            )


def compile(
    model: nn.Module,
    mesh: Mesh | None = None,
    example_inputs: Sequence[Any] | None = None,
    strategy: str = "dp",
    hints: Mapping[str, Placement | Sequence[Placement]] | None = None,
    input_sbp: Placement | Sequence[Any] | None = None,
    optimizer: OptimizerFactory | None = None,
    max_grad_norm: float | None = None,
    pipeline: Pipeline | None = None,
    zero: int = 0,
    memory_limit: int | str | None = None,
    recompute: bool | str | Sequence[str] = False,
    arena: bool | str = False,
    cuda_graphs: bool = False,
    inductor: bool = False,
    plan: ParallelPlan | None = None,
    embeddings: Any = None,
) -> Any:
    """Compile ``model`` (its forward returns a scalar loss) for ``mesh``; see the README's API sections.

    Returns a ``ParallelModule``, or with ``pipeline=sf.Pipeline(...)`` a ``PipelineModule`` (stages over
    the pipeline axis, data parallel over the others). ``arena=True`` places the step's temporaries at
    fixed offsets of one buffer, reused by lifetime, where that does not raise the predicted peak;
    ``arena="all"`` places every one it can, whatever the peak (static placement, graph/arena.py).
    ``cuda_graphs=True`` (one GPU) captures each step, update included, as a CUDA graph after two warm-up
    steps and replays it (runtime/cuda_graph.py). ``inductor=True`` compiles each rank's program with
    ``torch.compile``, breaking the graph at asynchronous messages and update hand-offs (runtime/inductor.py).
    ``plan=``: compile this ``sf.ParallelPlan`` (its mesh is the job's mesh; the planning keywords are then
    the plan's, and giving them too is an error); ``memory_limit`` still checks it.
    """
    if example_inputs is None:
        raise TypeError("sf.compile needs example_inputs=(...): the inputs of one step, as pm.step will get them")
    if embeddings is not None or (plan is not None and plan.tables):
        if embeddings is None:
            raise ValueError("the plan has sparse tables: give embeddings=sf.Embeddings(...) (their optimizer) too")
        if mesh is None and plan is None:
            raise TypeError("sf.compile needs a mesh (or plan=, which names its mesh)")
        keywords = _sparse_keywords(locals())
        pm = _sparse().compile(model, mesh, example_inputs, embeddings, optimizer, keywords, plan)
        limit = memory_limit if memory_limit is not None else device_limit(pm.mesh.device_type)
        if limit is not None:  # tables and dense program together (no alternatives priced for sparse plans yet)
            report = pm.memory()
            if max(report.peaks or [report.peak]) > parse_bytes(limit):
                raise _refusal(parse_bytes(limit), report, [])
        return pm
    if plan is not None:
        given = {
            "strategy": strategy != "dp", "hints": hints is not None, "input_sbp": input_sbp is not None,
            "max_grad_norm": max_grad_norm is not None, "pipeline": pipeline is not None, "zero": zero != 0,
            "recompute": recompute is not False, "arena": arena is not False, "cuda_graphs": cuda_graphs,
            "inductor": inductor,
        }  # fmt: skip
        both = [k for k, v in given.items() if v]
        if both:
            raise ValueError(
                f"sf.compile(plan=...) takes {both} from the plan; leave them out, or change the plan first "
                f"(plan.replace({both[0]}=...))"
            )
        return _compile_plan(model, mesh, plan, example_inputs, optimizer, memory_limit)
    if mesh is None:
        raise TypeError("sf.compile needs a mesh (or plan=, which names its mesh)")
    if recompute == "auto" and memory_limit is None:
        raise ValueError("recompute='auto' recomputes the fewest blocks that fit memory_limit: give memory_limit too")
    _check_options(pipeline, hints, input_sbp, zero, recompute, cuda_graphs, inductor)
    if cuda_graphs:  # by the zero asked for: on one device zero=1|2 leaves no layout to show it in the plan
        check_graphable(mesh, zero)
    if inductor:
        check_inductor(zero)
    built = build_plan(
        model, mesh, example_inputs, strategy, hints, input_sbp, max_grad_norm, pipeline, zero,
        False if recompute == "auto" else recompute, arena, cuda_graphs, inductor,
    )  # fmt: skip
    limit = None if recompute == "auto" else memory_limit
    pm = _compile_plan(model, mesh, built, example_inputs, optimizer, limit, hints)
    if recompute == "auto":
        assert memory_limit is not None
        _fewest_recomputed(pm, parse_bytes(memory_limit))
        _check_fits(pm, parse_bytes(memory_limit), model, optimizer, hints)
    return pm


def _compile_plan(
    model: nn.Module,
    mesh: Mesh | None,
    plan: ParallelPlan,
    example_inputs: Sequence[Any],
    optimizer: OptimizerFactory | None,
    memory_limit: int | str | None,
    hints: Mapping[str, Placement | Sequence[Placement]] | None = None,
) -> Any:
    """Build the module ``plan`` describes and check it fits ``memory_limit`` (default on GPUs: free memory;
    a refusal prices other strategies with ``hints``, the user's, when the plan was built from them)."""
    if not isinstance(plan, ParallelPlan):
        raise TypeError(f"plan= takes an sf.ParallelPlan (sf.plan(...) or ParallelPlan.from_json), got {plan!r}")
    if mesh is None:
        mesh = plan.mesh.build()  # collective, as making any mesh is
    elif mesh.virtual:
        raise ValueError(
            f"{mesh} is virtual (a description with no process groups): price a plan on it with plan.estimate(...); "
            "compile on a mesh of the job's ranks, sf.Mesh(...) without virtual=True"
        )
    elif MeshSpec.of(mesh) != plan.mesh:
        raise PlanError(f"the plan is for a {plan.mesh}, but the mesh given is {mesh}: give the plan's mesh")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    check_model(plan, shapes, len(example_inputs), {n for n, _ in model.named_modules()})
    if plan.values:  # keys name values of the traced step: checked on every rank alike, before anything is built
        plain = [x.full() if isinstance(x, GlobalTensor) else x for x in example_inputs]
        forced_nodes(trace_step(model, plain, mesh.device_type).graph.graph, plan.values, mesh)
    if memory_limit is None and not _PRICING:  # on GPUs: what the devices can still give (least over ranks)
        memory_limit = device_limit(mesh.device_type)
    keep_host_memory()  # steps reuse freed host blocks instead of page-faulting fresh ones (host_memory.py)
    if plan.pipeline is not None:
        p = plan.pipeline
        stage_meshes = None if p.stage_meshes is None else tuple(m.build() for m in p.stage_meshes)
        pipeline = Pipeline(
            axis=p.axis,
            split_points=p.split_points,
            micro_batches=p.micro_batches,
            schedule=p.schedule,
            stage_meshes=stage_meshes,
            split_backward=p.split_backward,
        )
        counter = functools.partial(model_flops, skeleton(model), device=mesh.device_type)
        pp = PipelineModule(
            model, mesh, pipeline, example_inputs, optimizer or default_optimizer, plan, StageProgram, counter
        )
        if memory_limit is not None:
            _check_pipeline_fits(pp, parse_bytes(memory_limit), model, optimizer)
        return pp
    e = plan.execution
    if e.cuda_graphs:
        check_graphable(mesh, plan.zero)
    if e.inductor:
        check_inductor(plan.zero)
    pm = ParallelModule(model, mesh, plan, optimizer or default_optimizer)
    pm.example_inputs = tuple(example_inputs)
    if memory_limit is not None:
        _check_fits(pm, parse_bytes(memory_limit), model, optimizer, hints)
    return pm


def _fewest_recomputed(pm: ParallelModule, limit: int) -> None:
    """Recompute the fewest leading blocks that make every rank's predicted peak fit ``limit`` (binary search
    over how many; earlier blocks first, their activations live longest). All of them when nothing fits:
    the check after names what else would help."""
    every = blocks(pm.module)
    lo, hi = 0, len(every)
    while lo < hi:
        k = (lo + hi) // 2
        pm.set_recompute(every[:k])
        if _largest(pm.memory()) <= limit:
            hi = k
        else:
            lo = k + 1
    pm.set_recompute(every[:lo])


def _largest(report: MemoryReport) -> int:
    """The largest rank's peak (this rank's alone in a process without a process group)."""
    return max(report.peaks or [report.peak])


class MemoryPlanError(ValueError):
    """A compiled plan would exceed ``memory_limit`` on some rank; the message names changes that fit."""


def _refusal(limit: int, report: MemoryReport, fixes: list[tuple[int, str]]) -> MemoryPlanError:
    """The error for a plan over ``limit``: every rank's peak, the largest items, and each priced change."""
    peaks = list(report.peaks) or [report.peak]
    worst = max(range(len(peaks)), key=peaks.__getitem__)
    lines = [
        f"the plan does not fit memory_limit={fmt_bytes(limit)}: rank {worst} would peak at "
        f"{fmt_bytes(peaks[worst])} (every rank: {', '.join(fmt_bytes(p) for p in peaks)}).",
        f"Largest items on rank {report.rank} ({report.where}):",
        *[f"  {fmt_bytes(b):>12}  {what}" for b, what in report.largest(5)],
        "Changes and their predicted peaks (largest rank):",
        *[f"  {what}: {fmt_bytes(b)} ({'fits' if b <= limit else 'does not fit'})" for b, what in sorted(fixes)],
    ]
    return MemoryPlanError("\n".join(lines))


def _check_pipeline_fits(pm: PipelineModule, limit: int, model: nn.Module, optimizer: OptimizerFactory | None) -> None:
    """Refuse a pipeline over ``limit`` before any step, pricing fewer activations in flight (1F1B instead of
    GPipe) and smaller micro-batches (twice as many) by the cost model (stages of different sizes: by compiling
    each, collectively)."""
    report = pm.memory()
    if max(report.peaks or [report.peak]) <= limit:
        return
    fixes: list[tuple[int, str]] = []
    p = pm.plan.pipeline
    assert p is not None
    options = [] if p.schedule == "1f1b" else [(dataclasses.replace(p, schedule="1f1b"), "schedule='1f1b'")]
    batch = pm.example_shapes[0][0] if pm.example_shapes and pm.example_shapes[0] else 0
    widest = max(len(g) for g in pm.grids)  # the same on every rank: each prices the same options
    if batch % (2 * p.micro_batches * widest) == 0:
        more = dataclasses.replace(p, micro_batches=2 * p.micro_batches)
        options.append((more, f"micro_batches={2 * p.micro_batches} (micro-batches half as large)"))
    estimator = Estimator(model, pm.example_inputs, optimizer)  # priced without building them
    for option, what in options:
        other = pm.plan.replace(pipeline=option)
        try:
            peak = max(estimator.peak_bytes(other))
        except NotImplementedError:  # stages of different sizes: compiled to price it (collective)
            with _pricing():
                peak = max(_compile_plan(model, pm.mesh, other, pm.example_inputs, optimizer, None).memory().peaks)
        fixes.append((peak, what))
    raise _refusal(limit, report, fixes)


def _check_fits(
    pm: ParallelModule,
    limit: int,
    model: nn.Module,
    optimizer: OptimizerFactory | None,
    hints: Mapping[str, Placement | Sequence[Placement]] | None = None,
) -> None:
    """Refuse, before any step, a plan whose predicted peak exceeds ``limit`` on some rank (collective: every
    rank predicts its own peak, the peaks are gathered, and every rank raises the same error). The changes
    priced: half the batch, every block recomputed, the other strategies (with ``hints``), ZeRO 2 and 3; the
    other plans by the cost model (``graph/estimate.py``), which lowers their programs without building them."""
    report = pm.memory()
    if max(report.peaks or [report.peak]) <= limit:
        return
    plain = [x.full() if isinstance(x, GlobalTensor) else x for x in pm.example_inputs]
    fixes: list[tuple[int, str]] = []
    batch = plain[0].shape[0] if plain and isinstance(plain[0], torch.Tensor) and plain[0].dim() else 0
    if batch > 1:
        half = [
            x[: batch // 2] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch else x for x in plain
        ]
        fixes.append((_largest(pm.memory(*half)), f"a batch of {batch // 2} per step instead of {batch}"))
    if len(pm.recomputed) < len(blocks(pm.module)):
        chosen = list(pm.recomputed)
        pm.set_recompute(blocks(pm.module))
        fixes.append((_largest(pm.memory()), "recompute=True (every block's activations recomputed in backward)"))
        pm.set_recompute(chosen)
    e = pm.plan.execution
    alternatives: list[tuple[str, Any]] = []
    for strategy in ("dp", "tp", "hybrid"):
        if strategy != pm.strategy:
            alternatives.append((f"strategy={strategy!r}", lambda s=strategy: build_plan(
                model, pm.mesh, plain, s, hints, None, pm.max_grad_norm, arena=e.arena
            )))  # fmt: skip
    dp, _ = axes_for(pm.mesh, pm.strategy)
    if dp is not None and pm.mesh.shape[dp] > 1:
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        for stage in (2, 3):
            if stage > pm.zero:
                what = f"zero={stage} (ZeRO stage {stage} on the dp axis)"
                alternatives.append((what, lambda k=stage: apply_zero(pm.plan, k, pm.mesh.names[dp], shapes)))
    estimator = Estimator(model, plain, optimizer)  # one trace of the step for every alternative
    for what, make in alternatives:
        try:
            other = make()
        except ValueError:
            continue  # the mesh has no axis for it, or the hints do not apply
        fixes.append((max(estimator.peak_bytes(other)), what))
    raise _refusal(limit, report, fixes)
