"""Pipeline parallelism: each stage of a cut model on its own ranks, micro-batches flowing through.

Every rank runs its stage's schedule (``schedule_run.py``) with no coordinator; a stage is data parallel over
its rows of ranks and tensor parallel along a ``tp`` axis (``stage_grid.py``), cut per micro-batch shape
(``stage_cut.py``), its activations crossing to stages of any size by cross-mesh boxing (``crossing.py``).
The step's loss and clipping are the serial model's: losses weighed by rows, the norm global over stages.
BatchNorm is refused (per-micro-batch statistics are not the serial model's).
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from shardflow.comm.groups import group_for
from shardflow.comm.init import world
from shardflow.ops.flop_count import Flops, FlopTally
from shardflow.ops.flops import OpFlops
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, Placement, is_split
from shardflow.plan import ParallelPlan
from shardflow.plan.knobs import Fixed, Knob, Unsupported, logged
from shardflow.runtime import trace as tracing
from shardflow.runtime.clip import clip_by_total, squared_norms
from shardflow.runtime.crossing import stage_crossings
from shardflow.runtime.memory import MemoryReport
from shardflow.runtime.micro_batches import MicroBatches, micro_batches
from shardflow.runtime.pipeline_config import Pipeline
from shardflow.runtime.pipeline_eval import eval_copy, evaluate_loss, refuse_method
from shardflow.runtime.pipeline_explain import explain_pipeline
from shardflow.runtime.pipeline_memory import pipeline_memory
from shardflow.runtime.pipeline_state import PipelineState
from shardflow.runtime.runner import OptimizerFactory
from shardflow.runtime.schedule import Action, stage_order
from shardflow.runtime.schedule_run import run_schedule
from shardflow.runtime.stage_buckets import StageBuckets, TiedGrads, tied_groups
from shardflow.runtime.stage_cut import Meta, cut, cut_other_shapes, plain, shape_key, whole_batch
from shardflow.runtime.stage_grid import stage_grid
from shardflow.runtime.stages import canonical_names
from shardflow.runtime.tensor_stage import local, local_grad, shard_stage

__all__ = ["Pipeline", "PipelineModule"]

# (stage module, layout per parameter id, the stage's tp row, example arguments, ids of the parameters whose
# gradients the program leaves as partial sums, static placement: graph/arena.py) -> a lowered stage program
# (graph/stage_program.py)
StageProgramFactory = Callable[
    [nn.Module, Mapping[int, Placement], Mesh, Sequence[Any], frozenset[int], bool | str], Any
]


class StageSize(NamedTuple):
    """A stage's parameters: how many tensors, and their elements."""

    tensors: int
    elements: int


class PipelineModule(PipelineState):
    """A model cut into stages over a mesh axis; ``step(*inputs)`` trains one step on the global batch."""

    # options of the plan that may change after compiling (plan/knobs.py): each re-plans
    bucket_bytes = Knob()
    max_grad_norm = Knob()
    arena = Knob()
    absent = "no stage on this rank"

    @property
    def pipeline(self) -> Pipeline:
        """The cut and schedule, as ``sf.Pipeline`` (read from the plan: change ``split_backward`` on the module)."""
        return dataclasses.replace(self._pipeline, split_backward=self.split_backward)

    @property
    def split_backward(self) -> bool:
        """Whether the last backward of a data-parallel stage after the first runs in two passes (a
        benchmark flips it between steps)."""
        return self.plan.pipeline.split_backward if self.plan.pipeline is not None else True

    @split_backward.setter
    def split_backward(self, value: bool) -> None:
        self.replan(split_backward=value)

    strategy = Fixed("the strategy the plan was built from")
    static = Unsupported("pipeline stages always run their lowered programs")
    updates = Unsupported("a stage updates once its last backward is over")
    inductor = Unsupported("inductor cannot be combined with pipeline= yet")
    cuda_graphs = Unsupported("cuda_graphs cannot be combined with pipeline= yet")

    def __init__(
        self,
        model: nn.Module,
        mesh: Mesh,
        pipeline: Pipeline,
        example_inputs: Sequence[Any],
        optimizer: OptimizerFactory,
        plan: ParallelPlan,
        stage_program: StageProgramFactory | None = None,
        count_flops: Callable[[Sequence[Any]], Flops] | None = None,
    ) -> None:
        self.mesh, self._pipeline, self._plan = mesh, pipeline, plan
        # the logical step's FLOPs on a global batch (the compiler's trace of the whole model, handed in)
        self.count_flops = count_flops
        self.logical_flops: dict[Any, Flops] = {}
        self.strategy = plan.strategy
        # makes a stage's lowered program (the compiler's, graph/stage_program.py: handed in, as the
        # compiler sits above the runtime): a tensor-parallel stage runs it; any stage counts memory by it
        self.stage_program = stage_program
        self.example_inputs = tuple(example_inputs)
        self.example_shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in example_inputs]
        self.state_meta = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
        self.canonical = canonical_names(model)
        self.param_order = [n for n, _ in model.named_parameters()]
        g = self.grid = stage_grid(mesh, pipeline, plan.strategy)  # collective: makes every stage's meshes
        self.grids, self.stage_ranks, self.flat, self.stages = g.grids, g.stage_ranks, g.flat, len(g.grids)
        self.stage, self.dp_index, self.tp_index, self.dp, self.tp = g.stage, g.dp_index, g.tp_index, g.dp, g.tp
        self.dp_ranks, self.row_mesh = g.dp_ranks, g.row_mesh
        self.tp_mesh = g.row_mesh if g.tp > 1 else None
        self._cut(model)
        self._keep_own_stage()
        self.tied = TiedGrads(tied_groups(self.split.tied, self.stage_ranks, self.inside, mesh.virtual))  # collective
        self.order: list[Action] = stage_order(pipeline.schedule, self.stage, self.stages, pipeline.micro_batches)
        # the optimizer steps plain tensors: a tensor-parallel stage's local shards (their .grad set per step)
        self.opt_params = [local(p) for p in self.params]
        self.optimizer = optimizer(self.opt_params) if self.params else None  # type: ignore[arg-type]  # a stage of activations only
        self._mark_partial()
        self._make_buckets()
        self._last_backward = False
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)
        self.recorder = tracing.Recorder(world()[0])
        self.events: list[tracing.Event] = []
        self.steps = 0

    # -- set-up ----------------------------------------------------------------------------------------
    def _cut(self, model: nn.Module) -> None:
        """Cut the model for the micro-batches' shapes (``stage_cut.py``), lay a tensor-parallel stage's
        parameters out over its tp row, and find what this rank exchanges at each boundary per micro-batch
        (collective: every rank shares its boundary row counts)."""
        whole = [plain(x) for x in self.example_inputs]
        micros = self._micro_batches(whole)[0]
        c = cut(model, self._pipeline, whole, micros[0], [len(r) for r in self.stage_ranks], self.stage)
        self.split, self.metas, self.modules = c.split, c.metas, c.modules
        self.module = c.modules[shape_key(micros[0])]
        self.layouts = self._tp_layouts()
        if self.tp_mesh is not None:
            names = self.split.names[self.stage]
            self.split.names[self.stage] = shard_stage(self.module, names, self.layouts[self.stage], self.tp_mesh)
        cut_other_shapes(model, c, micros, self.stage)  # sharing this stage's (sharded) parameters
        self.programs: dict[Any, Any] = {}  # this stage's lowered programs, per input signature and mode
        self.eval_modules: dict[Any, nn.Module] = {}  # this stage's eval copies, per micro-batch shape
        self.pieces, self.crossing_notes = stage_crossings([self._meta(m) for m in micros], self.grid)

    def _tp_layouts(self) -> list[dict[str, Placement]]:
        """Each tensor-parallel stage's parameter layouts over its tp row: the plan's, over each stage's
        (dp, tp) grid (tied copies whole)."""
        layouts: list[dict[str, Placement]] = [{} for _ in self.grids]
        for s, g in enumerate(self.grids):
            if len(g[0]) > 1:
                params = self._plan.params
                layouts[s] = {n: params[n].sbp[1] for n in self.split.names[s] if n in params}
                layouts[s].update({n: B for n in self.split.tied if n in self.split.names[s]})
        return layouts

    def _keep_own_stage(self) -> None:
        """Drop the other stages' modules: the names and sizes of their parameters are enough."""
        self.holders = [
            set(names) | {n for n, _ in m.named_buffers()} for names, m in zip(self.split.names, self.split.modules)
        ]
        self.sizes = [StageSize(len(names), sum(t.numel() for t in names.values())) for names in self.split.names]
        self.named = self.split.names[self.stage]
        self.params = list(self.named.values())
        self.split.modules = [m if s == self.stage else None for s, m in enumerate(self.split.modules)]  # type: ignore[misc]
        self.split.names = [n if s == self.stage else {} for s, n in enumerate(self.split.names)]
        # the cut's copy of the model and torch.export's graphs form reference cycles that would keep the
        # other stages' parameters alive until Python's next full collection
        gc.collect()

    def _mark_partial(self) -> None:
        """A tensor-parallel stage leaves the gradients of its replicated parameters (layer norms,
        row-parallel biases, tied copies) as partial sums over its tp ranks through the micro-batches, then
        sums them in one all-reduce over the stage's ranks (tp and dp at once) per step."""
        self.partial = frozenset(
            id(p)
            for n, p in self.named.items()
            if self.tp_mesh is not None and p.requires_grad and self.layouts[self.stage].get(n, B) == B
        )
        for p in self.params:
            if id(p) in self.partial:  # the eager gradient-layout hook (global_tensor.py) must leave them partial
                p._sf_partial_grad = True  # type: ignore[attr-defined]

    def replan(self, **changes: Any) -> None:
        """Change options of the plan (``plan.replace`` keywords): checked and logged; what was built from
        the old options (buckets, stage programs) is built anew. The cut, meshes and layouts cannot change."""
        allowed = {"bucket_bytes", "max_grad_norm", "arena", "split_backward"}
        refused = sorted(set(changes) - allowed)
        if refused:
            raise AttributeError(
                f"{refused} cannot change on a pipelined module (only {sorted(allowed)} can); compile another "
                "plan: sf.compile(model, plan=pm.plan.replace(...), example_inputs=..., optimizer=...)"
            )
        cut = changes.pop("split_backward", self.split_backward)
        if not isinstance(cut, bool):
            raise ValueError(f"split_backward must be True or False, got {cut!r}")
        new = self.plan.replace(**changes)
        if new.pipeline is not None and new.pipeline.split_backward != cut:
            new = new.replace(pipeline=dataclasses.replace(new.pipeline, split_backward=cut))
        if new == self.plan:
            return
        logged(self.plan, new)
        old, self._plan = self._plan, new
        if new.bucket_bytes != old.bucket_bytes:
            self._make_buckets()
        if new.execution.arena != old.execution.arena:
            self.programs.clear()

    def _make_buckets(self) -> None:
        """Gradient buckets over the stage's data-parallel group, and over all its ranks for the partial
        gradients of a tensor-parallel stage, sized by the plan."""
        mine = [p for n, p in self.named.items() if n not in self.split.tied]
        self.buckets = StageBuckets([p for p in mine if id(p) not in self.partial], self.dp_ranks, self.bucket_bytes)
        everyone = self.stage_ranks[self.stage] if self.partial else ()
        self.partial_buckets = StageBuckets([p for p in mine if id(p) in self.partial], everyone, self.bucket_bytes)

    def _micro_batches(self, inputs: Sequence[Any]) -> MicroBatches:
        """This rank's shard of each micro-batch of the batch ``inputs`` and each shard's loss weight."""
        widest = max(len(r) for r in self.stage_ranks)
        return micro_batches(inputs, self._pipeline.micro_batches, self.dp, self.dp_index, widest)

    def _meta(self, micro: list[Any]) -> list[Meta]:
        """Shapes and dtypes every stage returns for a micro-batch shaped like ``micro``."""
        return self.metas[shape_key(micro)]

    def _grad_ready(self, p: torch.Tensor) -> None:
        if self._last_backward:
            self.buckets.ready(p)  # type: ignore[arg-type]
            self.partial_buckets.ready(p)  # type: ignore[arg-type]

    # -- a step ------------------------------------------------------------------------------------------
    def step(self, *inputs: Any, trace: str | None = None) -> float:
        """One training step on the global batch ``inputs``; with ``trace``, rank 0 writes its timeline there."""
        if not self.inside:
            return float("nan")
        micro, weights = self._micro_batches(whole_batch(inputs, self.example_shapes))
        self.recorder.enabled = trace is not None
        self.recorder.events = []
        for module in self.modules.values():
            module.train()
        for p in self.params:
            p.grad = None
        for q in self.opt_params:
            q.grad = None
        losses = run_schedule(self, micro, weights)
        with self.recorder.span("all-reduce", "all-reduce gradients"):
            self.tied.launch(self.named)  # first, so they travel while the buckets' last all-reduces finish
            self.buckets.finish()
            self.partial_buckets.finish()
            self.tied.finish()
        with self.recorder.span("optimizer", "optimizer"):
            if self.max_grad_norm is not None:
                self._clip(self.max_grad_norm)
            if self.optimizer is not None:
                for p, q in zip(self.params, self.opt_params):
                    if q is not p:
                        q.grad = None if p.grad is None else local_grad(p)
                self.optimizer.step()
        last = self.stage == self.stages - 1
        # weighted by shares of the batch; a tensor-parallel stage holds each loss on every tp rank: one counts
        total = torch.stack(losses).sum() if last and self.tp_index == 0 else torch.zeros(())
        if self.mesh.size > 1:
            dist.all_reduce(total, group=group_for(self.mesh.ranks).group)
        self.steps += 1
        if trace is not None:
            self.gather_trace(self.recorder.events, trace)
        return float(total)

    def evaluate(self, *inputs: Any, method: str = "forward") -> Any:
        """The loss of the global batch ``inputs`` by the forward alone, in eval mode (``Runner.evaluate``,
        ``pipeline_eval.py``): a 0-d tensor equal on every rank of the mesh, None on ranks outside it."""
        refuse_method(method)
        if not self.inside:
            return None
        micro, weights = self._micro_batches(whole_batch(inputs, self.example_shapes))
        return evaluate_loss(self, micro, weights)

    @property
    def _splits(self) -> bool:
        return self._splits_stage(self.stage)

    def _splits_stage(self, s: int) -> bool:
        """Whether stage ``s`` splits its last backward: after the first, data parallel (tp rows of one rank:
        a tp stage's program is one autograd node), not turned off."""
        return self.split_backward and s > 0 and len(self.grids[s][0]) == 1

    def _run_stage(self, key: Any, args: list[Any]) -> Any:
        """The stage's forward on one micro-batch: the module itself, or on a tensor-parallel stage its
        lowered program (``graph/stage_program.py``) for this input signature, made at its first use."""
        if self.tp_mesh is None:
            return self._stage_module(key)(*args)
        out = self._stage_program(key, args)(args)
        return out if len(out) > 1 else out[0]

    def _stage_module(self, key: Any) -> nn.Module:
        """The stage module for ``key``; in eval mode its eval copy, made once (``pipeline_eval.py``)."""
        module = self.modules[key]
        if not module.training and key not in self.eval_modules:
            self.eval_modules[key] = eval_copy(module)
        return module if module.training else self.eval_modules[key]

    def _stage_program(self, key: Any, args: Sequence[Any]) -> Any:
        # an eval-mode forward gets a program of its own, traced from the eval copy (dropout off)
        needs = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        signature = (key, needs, self.modules[key].training)
        program = self.programs.get(signature)
        if program is None:
            if self.stage_program is None:
                raise ValueError(f"stage {self.stage} needs a program but no stage_program was given")
            layouts = self.layouts[self.stage]
            by_id = {id(p): layouts.get(name, B) for name, p in self.named.items()}
            arena = self.arena if self.tp_mesh is not None else False  # a dp stage's program only counts
            program = self.programs[signature] = self.stage_program(
                self._stage_module(key), by_id, self.row_mesh, args, self.partial, arena
            )
        return program

    def _program(self, micro: list[Any]) -> Any:
        """This stage's program for ``micro`` as a step would call it (received tensors requiring
        gradients), without running it: a tensor-parallel stage runs it, a data-parallel stage (lowered on
        its own row mesh) only has its memory counted by it."""
        received = []
        if self.stage > 0:
            for shape, dtype in self._meta(micro)[self.stage - 1]:
                t = torch.empty(shape, dtype=dtype)
                received.append(t.requires_grad_(True) if dtype.is_floating_point else t)
        args = [micro[k] if src == "input" else received[k] for src, k in self.split.wiring[self.stage]]
        return self._stage_program(shape_key(micro), args)

    def _clip(self, max_norm: float) -> None:
        """Global-norm clipping over every stage's gradients (a copy held by several stages counts once, a
        gradient split over a tensor-parallel stage's ranks by its pieces, a whole one by one of them)."""
        counted = [
            local_grad(p)
            for n, p in self.named.items()
            if p.grad is not None
            and min(self.split.tied.get(n, (self.stage,))) == self.stage
            and (self.tp_index == 0 or is_split(self.layouts[self.stage].get(n, B)))
        ]
        total = squared_norms(counted).sum()
        groups = []
        if self.mesh.size > 1:  # each data-parallel replica holds its stage's (reduced) sum: each adds its share
            total /= self.dp
            groups.append(group_for(self.mesh.ranks).group)
        clip_by_total(total, groups, [local_grad(p) for p in self.params if p.grad is not None], max_norm)

    def explain(self) -> str:
        """Stages, their parameters, the schedule of each stage and the expected bubble, for people."""
        return explain_pipeline(self)

    def flops(self, *inputs: Any) -> Flops:
        """See ``Runner.flops``: the whole model's step, and in ``rank`` this rank's stage program over
        its shard of every micro-batch, and the sum of a tied parameter's gradients from the stages holding
        it (the serial step's add, done here by the all-reduce between them)."""
        whole = whole_batch(inputs, self.example_shapes) if inputs else [plain(x) for x in self.example_inputs]
        if self.count_flops is None:
            raise ValueError(
                "this pipeline was built without a FLOP counter: build it with sf.compile(..., pipeline=...)"
            )
        key = shape_key(whole)
        if key not in self.logical_flops:  # a trace of the whole model: once per batch shape
            self.logical_flops[key] = self.count_flops(whole)
        logical = self.logical_flops[key]
        rank = Flops()
        if self.inside:
            for micro in self._micro_batches(whole)[0]:
                rank = rank + self._program(micro).program.flops.rank
            tied = FlopTally()
            summed = sum(local(p).numel() for n, p in self.named.items() if n in self.split.tied and p.requires_grad)
            tied.add("aten.add", "backward", OpFlops(vector=summed))
            rank = rank + tied.result()
        return logical.with_rank(rank)

    def _memory(self, inputs: Sequence[Any]) -> MemoryReport:
        """This rank's predicted memory (``pipeline_memory.py``)."""
        return pipeline_memory(self, inputs)
