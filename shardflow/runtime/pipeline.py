"""Pipeline parallelism: each stage of a cut model on its own slice of the mesh, micro-batches flowing through.

Decisions:
- **Stages and wiring** come from ``stages.py`` (torch.export-based cut at module boundaries). A stage owns
  the ranks with its coordinate on the pipeline axis, or the ranks of its own mesh
  (``Pipeline(stage_meshes=...)``, stages of any sizes); it is data parallel over them (each holds its rows
  of every micro-batch), except along a ``tp`` axis under ``strategy="tp"``/``"hybrid"``, where the stage's
  parameters take the Megatron layouts the strategy finds for the whole model (``tensor_stage.py``) and the
  stage runs as a lowered program of its forward and backward (``graph/stage_program.py``). What crosses a boundary is ``(S(0), B)`` over the ``(dp, tp)`` ranks
  on either side and moves by the cross-mesh boxing plan (``crossing.py``): with equal stages rank ``d``
  talks to rank ``d`` of the neighbours only; one rank may hand its rows to three, or two to one.
- **No coordinator.** Every rank runs its stage's action list from ``schedule.py`` (GPipe or 1F1B). Both
  neighbours derive the same order, so point-to-point messages (gloo/NCCL ``isend``/``irecv``) match by
  order and tag; the receive for the next action is posted before the current one computes, so transfers
  overlap compute. Activation shapes are known before the first step (fake-tensor propagation of every
  stage), so receives need no size handshake.
- **Gradients.** The last stage weighs each micro-batch's loss by its share of the batch's rows (micro-
  batches are cut like ``tensor_split``, so they may differ by a row; the model's loss is a mean over
  rows), and gradients are summed over data-parallel ranks; during the last backward of the
  step, post-accumulate hooks launch each full gradient bucket's all-reduce over the stage's data-parallel
  group at once (overlapped with the rest of that backward). Copies of a parameter held by several stages
  (tied embeddings) get their gradients summed over all those stages' ranks (one all-reduce), so every copy
  takes the same update.
- **The tail.** The step's last backward on a data-parallel stage after the first computes its inputs'
  gradients, sends them, then its weights' (``split_backward.py``, the B/W split of zero-bubble schedules):
  every schedule ends waiting for that gradient to walk back stage by stage, and each stage now hands it on
  a weight-gradient pass earlier. Earlier backwards stay whole: on CPU the split costs a stage more per
  micro-batch than the stage before gains while the last stage is the busiest (BENCHMARKS.md, Pipeline).
- **The step's result** is the global-batch mean loss on every rank (one all-reduce over the mesh), and
  clipping uses the global norm over all stages, as ``clip_grad_norm_`` on the serial model.
BatchNorm is refused (per-micro-batch statistics are not the serial model's).
"""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardflow.checkpoint.index import CheckpointError, read_index
from shardflow.checkpoint.rng import restore_rng, rng_states
from shardflow.checkpoint.snapshots import Snapshots
from shardflow.checkpoint.store import load as load_checkpoint
from shardflow.comm.groups import group_for
from shardflow.comm.init import collective_timeout, world
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, Placement, is_split
from shardflow.plan import ParallelPlan
from shardflow.plan.knobs import Fixed, Knob, Unsupported, logged
from shardflow.runtime import split_backward as split_passes
from shardflow.runtime import trace as tracing
from shardflow.runtime.crossing import Piece, crossing
from shardflow.runtime.memory import (
    MemoryReport,
    ProgramMemory,
    fmt_bytes,
    optimizer_bytes,
    unique_bytes,
    with_every_peak,
)
from shardflow.runtime.schedule import SCHEDULES, Action, bubble, in_flight, memory_peak, stage_order
from shardflow.runtime.stages import Split, balanced_split_points, canonical_names, split_model
from shardflow.runtime.tensor_stage import local, local_grad, set_local_grad, shard_stage
from shardflow.tensor.global_tensor import GlobalTensor, wrap

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
# (stage module, layout per parameter id, the stage's tp mesh, example args) -> a callable ``(args) -> outputs``
# (stage module, layout per parameter id, the stage's tp row, example arguments, ids of the parameters whose
# gradients the program leaves as partial sums, static placement: graph/arena.py) -> a lowered stage program
# (graph/stage_program.py)
StageProgramFactory = Callable[
    [nn.Module, Mapping[int, Placement], Mesh, Sequence[Any], frozenset[int], bool | str], Any
]
Meta = list[tuple[torch.Size, torch.dtype]]


@dataclass(frozen=True, kw_only=True)
class Pipeline:
    """How to pipeline a model: over mesh ``axis``, cut before ``split_points`` (None: balanced by FLOPs)."""

    axis: str = "pp"
    """Mesh axis whose coordinate is the stage; the other axes are data parallel inside each stage."""
    split_points: tuple[str, ...] | None = None
    """Module names (``"transformer.h.2"``) each stage after the first starts with; one fewer than stages."""
    micro_batches: int = 1
    """Micro-batches per step; the batch is cut like ``tensor_split`` (and each micro-batch again over the
    data-parallel ranks), so it needs at least ``micro_batches x data-parallel ranks`` rows."""
    schedule: str = "1f1b"
    """``"1f1b"`` (bounded activations) or ``"gpipe"`` (all forwards, then all backwards)."""
    stage_meshes: tuple[Mesh, ...] | None = None
    """One mesh per stage, of any sizes (``axis`` is then unused): stage ``s`` is data parallel over the ranks
    of ``stage_meshes[s]`` (tensor parallel over its ``tp`` axis under ``strategy="tp"``/``"hybrid"``), and
    activations cross between stages of different sizes by cross-mesh boxing. Their ranks must not overlap
    and together be the ranks of the mesh given to ``sf.compile``."""
    split_backward: bool = True
    """Run the step's last backward of each data-parallel stage after the first in two passes, its inputs'
    gradients sent before its weights' are computed (``runtime/split_backward.py``); False: one pass."""

    def __post_init__(self) -> None:
        if self.stage_meshes is not None:
            meshes = tuple(self.stage_meshes) if isinstance(self.stage_meshes, (list, tuple)) else None
            if not meshes or not all(isinstance(m, Mesh) for m in meshes):
                raise ValueError(
                    f"Pipeline.stage_meshes must be a list of sf.Mesh, one per stage, got {self.stage_meshes!r}"
                )
            object.__setattr__(self, "stage_meshes", meshes)
        if self.split_points is not None:
            if isinstance(self.split_points, str) or not all(isinstance(p, str) for p in self.split_points):
                raise ValueError(f"Pipeline.split_points must be a list of module names, got {self.split_points!r}")
            object.__setattr__(self, "split_points", tuple(self.split_points))
        m = self.micro_batches
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"Pipeline.micro_batches must be a positive int, got {m!r}")
        if not isinstance(self.split_backward, bool):
            raise ValueError(f"Pipeline.split_backward must be True or False, got {self.split_backward!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Pipeline.schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass
class _Buckets:
    """Gradient buckets over one data-parallel group, launched as their last gradient arrives."""

    params: list[nn.Parameter]
    group: Any
    size: int
    bucket_bytes: int
    of: dict[int, int] = field(default_factory=dict)
    members: list[list[nn.Parameter]] = field(default_factory=list)
    left: list[int] = field(default_factory=list)
    flying: list[tuple[Any, torch.Tensor, list[nn.Parameter]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        nbytes = self.bucket_bytes
        for p in reversed(self.params):  # backward produces gradients roughly in reverse order
            if nbytes >= self.bucket_bytes:
                self.members.append([])
                nbytes = 0
            self.of[id(p)] = len(self.members) - 1
            self.members[-1].append(p)
            nbytes += p.numel() * p.element_size()
        self.reset()

    def reset(self) -> None:
        self.left = [len(b) for b in self.members]
        self.flying = []

    def ready(self, p: nn.Parameter) -> None:
        b = self.of.get(id(p))
        if b is None or self.size == 1:
            return
        self.left[b] -= 1
        if self.left[b] == 0:
            self._launch(b)

    def _launch(self, b: int) -> None:
        self.left[b] = -1
        ps = self.members[b]
        grads = [local_grad(p) if p.grad is not None else torch.zeros_like(local(p)) for p in ps]
        # one count per parameter rides along: how many ranks had a gradient for it
        used = torch.tensor([p.grad is not None for p in ps], dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [used])
        self.flying.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, ps))

    def finish(self) -> None:
        if self.size == 1:
            return
        for b, left in enumerate(self.left):
            if left > 0:  # parameters this rank did not use: zeros in the sum
                self._launch(b)
        for work, flat, ps in self.flying:
            work.wait()
            used = flat[-len(ps) :].tolist()
            offset = 0
            for p, count in zip(ps, used):
                n = local(p).numel()
                if count:
                    set_local_grad(p, flat[offset : offset + n])
                else:  # no rank used it: no gradient, as in plain PyTorch (no decay, no optimizer state)
                    p.grad = None
                offset += n
        self.reset()


@dataclass
class Crossings:
    """What one rank exchanges at its stage's boundaries for one micro-batch, per boundary tensor."""

    recv: list[list[Piece]]  # activations from the stage before
    send: list[list[Piece]]  # activations to the stage after
    grads_in: list[list[Piece]]  # gradients of what it sent, from the stage after
    grads_out: list[list[Piece]]  # gradients of what it received, to the stage before


class PipelineModule(Snapshots):
    """A model cut into stages over a mesh axis; ``step(*inputs)`` trains one step on the global batch."""

    # options of the plan that may change after compiling (plan/knobs.py): each re-plans
    bucket_bytes = Knob()
    max_grad_norm = Knob()
    arena = Knob()

    @property
    def plan(self) -> ParallelPlan:
        """The plan this module runs (change its options with ``pm.<option> = ...`` or ``replan``)."""
        return self._plan

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
    ) -> None:
        self.mesh, self._pipeline, self._plan = mesh, pipeline, plan
        strategy = self.strategy = plan.strategy
        # makes a stage's lowered program (the compiler's, graph/stage_program.py: handed in, as the
        # compiler sits above the runtime): a tensor-parallel stage runs it; any stage counts memory by it
        self.stage_program = stage_program
        # each stage's ranks as grid[dp][tp]: data parallel over its rows, tensor parallel along them
        self.grids = [_grid(m, s, strategy) for s, m in enumerate(_stages(mesh, pipeline))]
        self.stage_ranks = [tuple(r for row in g for r in row) for g in self.grids]
        self.stages = len(self.grids)
        self.example_inputs = tuple(example_inputs)
        self.example_shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in example_inputs]
        self.state_meta = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
        self.canonical = canonical_names(model)  # tied parameters: every name -> the one stages use
        rank = world()[0]
        self.inside = rank in mesh
        me = rank if self.inside else self.stage_ranks[0][0]
        self.stage = next(s for s, ranks in enumerate(self.stage_ranks) if me in ranks)
        grid = self.grids[self.stage]
        self.dp_index = next(i for i, row in enumerate(grid) if me in row)
        self.tp_index = grid[self.dp_index].index(me)
        self.dp, self.tp = len(grid), len(grid[0])
        self.dp_ranks = tuple(row[self.tp_index] for row in grid)  # this rank's data-parallel group
        # every stage as a (dp, tp) mesh: the layouts boundary tensors are boxed between, and snapshots'
        # meshes; and every tensor-parallel row as a 1-d mesh (collective: every rank makes every one)
        self.flat = [
            Mesh(mesh.device_type, (len(g), len(g[0])), names=("dp", "tp"), ranks=[r for row in g for r in row])
            for g in self.grids
        ]
        rows = [[Mesh(mesh.device_type, (len(row),), names=("tp",), ranks=row) for row in g] for g in self.grids]
        self.row_mesh = rows[self.stage][self.dp_index]  # this rank's tp row (itself alone on a dp stage)
        self.tp_mesh = self.row_mesh if self.tp > 1 else None
        plain = [_plain(x) for x in example_inputs]
        micros = self._micro_batches(plain)[0]
        micro = micros[0]
        points = pipeline.split_points
        if points is None:  # cut by FLOPs of the whole first micro-batch (the same on every rank)
            whole = [x.tensor_split(pipeline.micro_batches)[0] if _batched(x) else x for x in plain]
            sizes = [len(r) for r in self.stage_ranks]
            points = tuple(balanced_split_points(model, whole, self.stages, capacity=sizes))
        if len(points) != self.stages - 1:
            where = (
                f"{self.stages} stage meshes were given"
                if pipeline.stage_meshes
                else f"mesh axis {pipeline.axis!r} has {self.stages} ranks"
            )
            raise ValueError(
                f"{len(points)} split points {list(points)} make {len(points) + 1} stages, but {where}: "
                f"give {self.stages - 1} split points"
            )
        self.split: Split = split_model(model, micro, points)
        self.metas: dict[Any, list[Meta]] = {_shape_key(micro): _boundaries(self.split, micro)}
        self.module = self.split.modules[self.stage]
        # tensor-parallel stages: each stage's parameters laid out over its tp rows (tied copies whole)
        self.layouts: list[dict[str, Placement]] = [{} for _ in self.grids]
        for s, g in enumerate(self.grids):
            if len(g[0]) > 1:
                # the plan's layouts are over each stage's (dp, tp) grid: its tp entries
                self.layouts[s] = {n: plan.params[n].sbp[1] for n in self.split.names[s] if n in plan.params}
                self.layouts[s].update({n: B for n in self.split.tied if n in self.split.names[s]})
        if self.tp_mesh is not None:
            self.split.names[self.stage] = shard_stage(
                self.module, self.split.names[self.stage], self.layouts[self.stage], self.tp_mesh
            )
        # NOTE: torch.export specialises shapes, so micro-batches of another size (tensor_split's cuts
        # differ by a row) get a stage module cut for their shape, sharing this one's parameters
        self.modules = {_shape_key(micro): self.module}
        self.programs: dict[Any, Any] = {}  # this stage's lowered programs, per input signature
        for other in micros:
            key = _shape_key(other)
            if key not in self.modules:
                again = split_model(model, other, points)
                self.metas[key] = _boundaries(again, other)
                self.modules[key] = _share(again.modules[self.stage], self.module)
        # which rows of each boundary tensor go to which rank of the next stage (collective: shares row counts)
        self.pieces = self._crossings(micros)
        # every rank keeps its own stage only: the names and sizes of the others' parameters are enough
        self.holders = [
            set(names) | {n for n, _ in m.named_buffers()} for names, m in zip(self.split.names, self.split.modules)
        ]
        self.sizes = [(len(names), sum(t.numel() for t in names.values())) for names in self.split.names]
        self.named = self.split.names[self.stage]
        self.params = list(self.named.values())
        self.split.modules = [m if s == self.stage else None for s, m in enumerate(self.split.modules)]  # type: ignore[misc]
        self.split.names = [n if s == self.stage else {} for s, n in enumerate(self.split.names)]
        # the cut's copy of the model and torch.export's graphs form reference cycles that would keep the
        # other stages' parameters alive until Python's next full collection
        gc.collect()
        self.tied_groups = self._tied_groups()  # collective: every rank creates every group
        self.order: list[Action] = stage_order(pipeline.schedule, self.stage, self.stages, pipeline.micro_batches)
        # the optimizer steps plain tensors: a tensor-parallel stage's local shards (their .grad set per step)
        self.opt_params = [local(p) for p in self.params]
        self.optimizer = optimizer(self.opt_params) if self.params else None  # type: ignore[arg-type]  # a stage of activations only
        # a tensor-parallel stage leaves the gradients of its replicated parameters (layer norms, row-parallel
        # biases, tied copies) as partial sums over its tp ranks: summed over the micro-batches as they are,
        # then one all-reduce over the stage's ranks (tp and dp at once) per step, instead of an all-reduce
        # over tp in every micro-batch's backward and one over dp at the end
        self.partial = frozenset(
            id(p)
            for n, p in self.named.items()
            if self.tp_mesh is not None and p.requires_grad and self.layouts[self.stage].get(n, B) == B
        )
        for p in self.params:
            if id(p) in self.partial:  # the eager gradient-layout hook (global_tensor.py) must leave them partial
                p._sf_partial_grad = True  # type: ignore[attr-defined]
        self._make_buckets()
        self._last_backward = False
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)
        self.param_order = [n for n, _ in model.named_parameters()]  # the index of optimizer state in snapshots
        self.recorder = tracing.Recorder(rank)
        self.events: list[tracing.Event] = []  # every rank's events of the last traced step
        self.steps = 0

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
        self.buckets = _Buckets(
            [p for n, p in self.named.items() if n not in self.split.tied and id(p) not in self.partial],
            group_for(self.dp_ranks).group if self.dp > 1 else None,
            self.dp,
            self.bucket_bytes,
        )
        stage_ranks = self.stage_ranks[self.stage]
        self.partial_buckets = _Buckets(
            [p for n, p in self.named.items() if n not in self.split.tied and id(p) in self.partial],
            group_for(stage_ranks).group if self.partial else None,
            len(stage_ranks) if self.partial else 1,
            self.bucket_bytes,
        )

    # -- set-up ----------------------------------------------------------------------------------------
    def _micro_batches(self, inputs: Sequence[Any]) -> tuple[list[list[Any]], list[float]]:
        """This rank's shard of each micro-batch (the batch cut into ``m`` micro-batches, each cut over dp,
        both like ``tensor_split``) and each shard's share of the batch's rows: the weight of its loss."""
        m = self._pipeline.micro_batches
        rows = {x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0}
        if len(rows) != 1:
            raise ValueError(f"pipeline inputs must share one batch dim (dim 0); got batch sizes {sorted(rows)}")
        batch = rows.pop()
        widest = max(len(r) for r in self.stage_ranks)
        if batch < m * widest:
            raise ValueError(
                f"a batch of {batch} rows leaves some of the {m} micro-batches x {widest} data-parallel ranks "
                f"empty; use at least {m * widest} rows or fewer micro_batches"
            )
        out, weights = [], []
        for j in range(m):
            shard = []
            for x in inputs:
                if isinstance(x, torch.Tensor) and x.dim() > 0:
                    x = x.tensor_split(m)[j].tensor_split(self.dp)[self.dp_index]
                shard.append(x)
            out.append(shard)
            weights.append(next(x.shape[0] for x in shard if isinstance(x, torch.Tensor) and x.dim() > 0) / batch)
        return out, weights

    def _meta(self, micro: list[Any]) -> list[Meta]:
        """Shapes and dtypes every stage returns for a micro-batch shaped like ``micro``."""
        return self.metas[_shape_key(micro)]

    def _crossings(self, micros: list[list[Any]]) -> list[Crossings]:
        """Per micro-batch, what this rank exchanges with the stages beside it (``crossing.py``): the pieces
        of each tensor it receives from the stage before and of each tensor it sends to the stage after, and
        those of their gradients. Collective over the job (every rank shares its boundary row counts)."""
        # dim 0 (1 for a 0-d tensor) and the other dims of every boundary tensor on this rank's shard
        mine = [[[(tuple(shape) or (1,), dtype) for shape, dtype in meta] for meta in self._meta(m)] for m in micros]
        every: list[Any] = [mine]
        if dist.is_initialized() and world()[1] > 1:
            every = [None] * world()[1]
            dist.all_gather_object(every, mine)
        me = self.grids[self.stage][self.dp_index][self.tp_index]
        self.crossing_notes: dict[int, tuple[int, list[tuple[int, int, int]]]] = {}
        out: list[Crossings] = []
        for j in range(len(micros)):
            c = Crossings([], [], [], [])
            for b in range(self.stages - 1):
                src, dst = [row[0] for row in self.grids[b]], [row[0] for row in self.grids[b + 1]]
                for k, (shape, dtype) in enumerate(every[src[0]][j][b]):  # every rank checks every boundary
                    what = f"tensor {k} from stage {b} to stage {b + 1} (micro-batch {j})"
                    rows = tuple(every[r][j][b][k][0][0] for r in src)
                    expect = tuple(every[r][j][b][k][0][0] for r in dst)
                    ahead, back = crossing(rows, expect, shape[1:], dtype, self.flat[b], self.flat[b + 1], what)
                    if j == 0 and k == 0:  # for explain(): who sends which rows to whom
                        moves = [(r, p.peer, p.stop - p.start) for r in self.flat[b].ranks for p in ahead.get(r, [])]
                        self.crossing_notes[b] = (len(every[src[0]][j][b]), moves)
                    if self.stage == b:
                        c.send.append(ahead.get(me, []))
                        c.grads_in.append(back.get(me, []))
                    elif self.stage == b + 1:
                        c.recv.append(ahead.get(me, []))
                        c.grads_out.append(back.get(me, []))
            out.append(c)
        return out

    def _tied_groups(self) -> dict[str, Any]:
        """For each parameter held by several stages, the group of all those stages' ranks (collective)."""
        mine: dict[str, Any] = {}
        made: dict[tuple[int, ...], Any] = {}
        for name, stages in sorted(self.split.tied.items()):
            ranks = tuple(sorted(r for s in stages for r in self.stage_ranks[s]))
            if ranks not in made:
                made[ranks] = dist.new_group(list(ranks), timeout=collective_timeout())
            if self.inside and world()[0] in ranks:
                mine[name] = made[ranks]
        return mine

    def _grad_ready(self, p: torch.Tensor) -> None:
        if self._last_backward:
            self.buckets.ready(p)  # type: ignore[arg-type]
            self.partial_buckets.ready(p)  # type: ignore[arg-type]

    # -- a step ------------------------------------------------------------------------------------------
    def step(self, *inputs: Any, trace: str | None = None) -> float:
        """One training step on the global batch ``inputs``; with ``trace``, rank 0 writes its timeline there."""
        if not self.inside:
            return float("nan")
        plain = [_plain(x) for x in inputs]
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in plain]
        if shapes != self.example_shapes:
            raise ValueError(
                f"pipeline inputs of shapes {shapes}, but the stages were cut for {self.example_shapes}: "
                "compile again with example inputs of the new shape"
            )
        micro, weights = self._micro_batches(plain)
        self.recorder.enabled = trace is not None
        self.recorder.events = []
        for module in self.modules.values():
            module.train()
        for p in self.params:
            p.grad = None
        for q in self.opt_params:
            q.grad = None
        losses = self._run_schedule(micro, weights)
        with self.recorder.span("all-reduce", "all-reduce gradients"):
            tied = []  # launched first, so they travel while the buckets' last all-reduces finish
            for name, group in self.tied_groups.items():
                p = self.named[name]
                # every data-parallel rank of every holding stage has a part of the sum (tied copies stay out
                # of the buckets), each tp rank of a tensor-parallel stage a partial sum; the last element
                # counts the ranks that had one (none: no gradient, as in plain PyTorch)
                g = local_grad(p).reshape(-1) if p.grad is not None else local(p).new_zeros(local(p).numel())
                flat = torch.cat([g, g.new_ones(1) if p.grad is not None else g.new_zeros(1)])
                tied.append((p, flat, dist.all_reduce(flat, group=group, async_op=True)))
                p.grad = None
            self.buckets.finish()
            self.partial_buckets.finish()
            for p, flat, work in tied:
                work.wait()
                if flat[-1].item():
                    set_local_grad(p, flat[:-1])  # a tp stage's partial sum (P) is now the whole gradient
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
            self._gather_trace(trace)
        return float(total)

    def _run_schedule(self, micro: list[list[Any]], weights: list[float]) -> list[torch.Tensor]:
        first, last = self.stage == 0, self.stage == self.stages - 1
        posted: dict[Action, tuple[list[Any], list[torch.Tensor]]] = {}
        saved: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        # NOTE: a send holds its tensor until it is waited for. Activations sent after F(j) are waited for at
        # B(j) (the next stage has long received them: their gradient came back), gradients as soon as they
        # are done; holding every send to the end of the step would keep all m micro-batches' outputs alive
        # and undo what 1F1B saves.
        sent: dict[int, list[Any]] = {}
        sends: list[Any] = []
        losses: list[torch.Tensor] = []

        def post(a: Action) -> None:
            if a in posted:
                return
            c = self.pieces[a.micro_batch]
            if a.kind == "F" and not first:  # activations, from the ranks of the stage before
                meta = self._meta(micro[a.micro_batch])[self.stage - 1]
                bufs = [torch.empty(shape, dtype=dtype) for shape, dtype in meta]
                pieces, tag = c.recv, 0
            elif a.kind == "B" and not last:  # gradients of what this rank sent, from the stage after
                meta = self._meta(micro[a.micro_batch])[self.stage]
                kept = [k for k, (_, d) in enumerate(meta) if d.is_floating_point]
                bufs = [torch.empty(meta[k][0], dtype=meta[k][1]) for k in kept]
                pieces, tag = [c.grads_in[k] for k in kept], 1
            else:
                posted[a] = ([], [])
                return
            posted[a] = (
                [dist.irecv(_rows(b)[p.rows], p.peer, tag=tag) for b, ps in zip(bufs, pieces) for p in ps],
                bufs,
            )

        for i, a in enumerate(self.order):
            post(a)
            if i + 1 < len(self.order):
                post(self.order[i + 1])  # the next message travels while this action computes
            works, bufs = posted.pop(a)
            with self.recorder.span("recv", f"wait {a}"):
                for w in works:
                    w.wait()
            j = a.micro_batch
            if a.kind == "F":
                received = [b.requires_grad_(True) if b.is_floating_point() else b for b in bufs]
                args = [micro[j][k] if src == "input" else received[k] for src, k in self.split.wiring[self.stage]]
                with self.recorder.span("compute", f"F{j}"), self._naming(a):
                    out = self._run_stage(_shape_key(micro[j]), args)
                outs = list(out) if isinstance(out, (tuple, list)) else [out]
                if last:
                    losses.append(outs[0].detach() * weights[j])
                else:
                    to = self.pieces[j].send
                    sent[j] = [
                        dist.isend(_rows(o.detach().contiguous())[p.rows], p.peer, tag=0)
                        for o, ps in zip(outs, to)
                        for p in ps
                    ]
                saved[j] = (received, outs)
            else:
                for w in sent.pop(j, []):
                    w.wait()
                sends = [w for w in sends if not w.is_completed()]
                received, outs = saved.pop(j)
                self._last_backward = j == self.order[-1].micro_batch
                with self.recorder.span("compute", f"B{j}"), self._naming(a):
                    inputs, dx, split = self._backward(received, outs, bufs, weights[j])
                if not first:  # each received piece's gradient goes back to the rank it came from
                    back = [ps for t, ps in zip(received, self.pieces[j].grads_out) if t.is_floating_point()]
                    sends += [
                        dist.isend(_rows(g if g is not None else torch.zeros_like(t))[p.rows], p.peer, tag=1)
                        for t, g, ps in zip(inputs, dx, back)
                        for p in ps
                    ]
                if split is not None:  # the weights' gradients, once the inputs' are on their way
                    with self.recorder.span("compute", f"W{j}"), self._naming(a):
                        split.weights()
                    # the retained graph (activations only the first pass read) goes with its last reference
                    split = out = outs = received = None  # type: ignore[assignment]
                self._last_backward = False
        with self.recorder.span("recv", "wait sends"):
            for w in [*sends, *(w for ws in sent.values() for w in ws)]:
                w.wait()
        return losses

    @property
    def _splits(self) -> bool:
        return self._splits_stage(self.stage)

    def _splits_stage(self, s: int) -> bool:
        """Whether stage ``s`` splits its last backward: after the first, data parallel (tp rows of one rank:
        a tp stage's program is one autograd node), not turned off."""
        return self.split_backward and s > 0 and len(self.grids[s][0]) == 1

    def _backward(
        self, received: list[torch.Tensor], outs: list[torch.Tensor], grads_in: list[torch.Tensor], weight: float
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], split_passes.SplitBackward | None]:
        """One micro-batch's backward: the received inputs, their gradients, and the weights' pass still to
        run (None: done). The step's last backward on a data-parallel stage after the first computes only the
        inputs' gradients here (``runtime/split_backward.py``): the tail of every schedule waits for them, and
        on earlier micro-batches the split costs this stage more than the stage before gains. A tp stage's
        program computes both in one autograd node: nothing to split."""
        if self.stage == self.stages - 1:
            roots: list[torch.Tensor] = [outs[0] * weight]
            grads: list[torch.Tensor | None] = [None]
        else:
            floats = [o for o in outs if o.is_floating_point()]
            pairs = [(o, g) for o, g in zip(floats, grads_in) if o.requires_grad]
            roots, grads = [o for o, _ in pairs], [g for _, g in pairs]
        inputs = [t for t in received if t.is_floating_point()]
        split = None
        if inputs and self._splits and self._last_backward:
            split = split_passes.plan(roots, grads, inputs)
        if split is not None:
            return inputs, split.inputs_first(), split
        torch.autograd.backward(roots, grads)
        return inputs, [t.grad for t in inputs], None

    def _run_stage(self, key: Any, args: list[Any]) -> Any:
        """The stage's forward on one micro-batch: the module itself, or on a tensor-parallel stage its
        lowered program (``graph/stage_program.py``) for this input signature, made at its first use."""
        if self.tp_mesh is None:
            return self.modules[key](*args)
        out = self._stage_program(key, args)(args)
        return out if len(out) > 1 else out[0]

    def _stage_program(self, key: Any, args: Sequence[Any]) -> Any:
        signature = (key, tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args))
        program = self.programs.get(signature)
        if program is None:
            if self.stage_program is None:
                raise ValueError(f"stage {self.stage} needs a program but no stage_program was given")
            layouts = self.layouts[self.stage]
            by_id = {id(p): layouts.get(name, B) for name, p in self.named.items()}
            arena = self.arena if self.tp_mesh is not None else False  # a dp stage's program only counts
            program = self.programs[signature] = self.stage_program(
                self.modules[key], by_id, self.row_mesh, args, self.partial, arena
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
        return self._stage_program(_shape_key(micro), args)

    @contextmanager
    def _naming(self, action: Action) -> Iterator[None]:
        """Add the stage, rank and action to an error raised by the stage's model code."""
        try:
            yield
        except Exception as exc:
            what = "forward" if action.kind == "F" else "backward"
            note = f"in pipeline stage {self.stage} on rank {world()[0]}, {what} of micro-batch {action.micro_batch}"
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(note)
            raise

    def _clip(self, max_norm: float) -> None:
        """Global-norm clipping over every stage's gradients (a copy held by several stages counts once, a
        gradient split over a tensor-parallel stage's ranks by its pieces, a whole one by one of them)."""
        grads = [
            local_grad(p)
            for n, p in self.named.items()
            if p.grad is not None
            and min(self.split.tied.get(n, (self.stage,))) == self.stage
            and (self.tp_index == 0 or is_split(self.layouts[self.stage].get(n, B)))
        ]
        norms = torch.stack(torch._foreach_norm(grads)).double() if grads else torch.zeros(1, dtype=torch.float64)
        total = norms.square().sum()
        if self.mesh.size > 1:  # each data-parallel replica holds its stage's (reduced) sum: each adds its share
            total /= self.dp
            dist.all_reduce(total, group=group_for(self.mesh.ranks).group)
        coef = max_norm / (float(total.sqrt()) + 1e-6)
        mine = [local_grad(p) for p in self.params if p.grad is not None]
        if coef < 1.0 and mine:
            torch._foreach_mul_(mine, coef)

    def _gather_trace(self, path: str) -> None:
        events: list[Any] = [None] * self.mesh.size
        dist.all_gather_object(events, self.recorder.events, group=group_for(self.mesh.ranks).group)
        self.events = [e for rank_events in events for e in rank_events]
        if world()[0] == self.mesh.ranks[0]:
            tracing.write(self.events, path)

    # -- reading it back -------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors named as in ``model.state_dict()``, equal on every rank of the mesh (collective)."""
        if not self.inside:
            return {}
        mine = {**self.named, **dict(self.module.named_buffers())}
        group = group_for(self.mesh.ranks).group if self.mesh.size > 1 else None
        out: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in self.state_meta.items():
            key = self.canonical.get(name, name)
            owner = self._owner_stage(key)
            if owner != self.stage:
                value = torch.empty(shape, dtype=dtype)
            elif isinstance(held := mine[key], GlobalTensor):  # a tensor-parallel stage's shard: gathered
                with torch.no_grad():
                    value = held.full().clone()
            else:
                value = mine[key].detach().clone()
            if self.mesh.size > 1:
                dist.broadcast(value, src=self.stage_ranks[owner][0], group=group)
            out[name] = value
        return out

    # -- memory ----------------------------------------------------------------------------------------
    def memory(self, *inputs: Any) -> MemoryReport:
        """Predicted memory of a step on this rank, with every rank's peak (collective over the job).

        Per stage: parameters, gradients (cleared at the step's start, made by the first backward, then
        accumulated), optimizer state, and per micro-batch what the stage's lowered program says (the one a
        tensor-parallel stage runs; a data-parallel stage's is lowered on this rank alone, for the count
        only): the activations its forward hands its backward, plus the stage's outputs and received
        inputs, and its backward's temporaries (the program's peak beyond what it saves). The schedule's
        order of forwards and backwards is then walked (``schedule.memory_peak``): the worst moment is the
        micro-batches in flight times their activations, with the gradients once they exist and a
        backward's temporaries while one runs. At the end, the gradient buckets copy the gradients once.
        """
        if self.inside:
            plain = [_plain(x) for x in (inputs or self.example_inputs)]
            first = self._micro_batches(plain)[0][0]
            # the stage's lowered program counts it (a data-parallel stage's lowered on this rank alone,
            # for the count only): what its forward saves for its backward, and its peak beyond that
            lowered = self._program(first).program
            held = self._meta(first)[self.stage - 1] if self.stage > 0 else []
            if self.stage < self.stages - 1:
                held = [*held, *self._meta(first)[self.stage]]
            act = lowered.saved_bytes + sum(math.prod(shape) * dtype.itemsize for shape, dtype in held)
            assert lowered.memory is not None
            arena = lowered.arena.nbytes if lowered.arena is not None else 0  # held from the first step on
            temps = max(lowered.memory.peak - lowered.saved_bytes - arena, 0)
            params = unique_bytes([local(p).detach() for p in self.params])
            grads = unique_bytes([local(p).detach() for p in self.params if p.requires_grad])
            # a tensor-parallel stage's optimizer steps the local shards (plain tensors, no requires_grad)
            tp = self.tp_mesh is not None
            state, temp, note = optimizer_bytes(self.optimizer, tp) if self.optimizer else (0, 0, "no parameters")
            buckets = unique_bytes(
                [local(p).detach() for b in (self.buckets, self.partial_buckets) if b.size > 1 for p in b.params]
            )
            # a tp stage's gradients are GlobalTensors, which autograd accumulates out of place (old + new)
            summing = grads if self.tp_mesh is not None else 0
            # the last backward split in two passes holds the gradients its weights' pass reads between them
            tail = split_passes.held_between_passes(self._program(first).traced.joint) if self._splits else 0
            during, action, k, with_grads = memory_peak(self.order, act, grads, temps, summing, tail, self._splits)
            at_peak = [(k * act, f"activations kept for backward: {k} micro-batch(es) in flight x {fmt_bytes(act)}")]
            if with_grads:
                at_peak.append((grads, "gradients (accumulated over micro-batches)"))
            if during > k * act + (grads if with_grads else 0):
                at_peak.append((temps, "one backward's temporaries (its program's peak beyond what it saves)"))
                if tail and self._splits and action == self.order[-1]:
                    at_peak.append((tail, "the last backward's gradients held between its two passes"))
                if with_grads and summing:
                    at_peak.append((summing, "gradients summed out of place (GlobalTensors)"))
            where = f"stage {self.stage}: {action!r} under {self._pipeline.schedule}, {k} micro-batch(es) in flight"
            # a split last backward keeps its activations until its weights' pass ends, as the buckets launch
            kept = act if self._splits and buckets else 0
            if grads + buckets + kept > during:
                at_peak, during = [(grads, "gradients"), (buckets, "gradient buckets")], grads + buckets + kept
                if kept:
                    at_peak.append((kept, "the last micro-batch's activations, until its weights' pass ends"))
                where = f"stage {self.stage}: gradient all-reduce"
            program = ProgramMemory(during, sorted(at_peak, reverse=True), grads, where)
            persistent = {"parameters": params, "optimizer state": state}
            if arena:
                persistent["arena of the stage program"] = arena
            report = MemoryReport(world()[0], persistent, program, grads + temp, note)
        else:
            report = MemoryReport(world()[0], {}, ProgramMemory(0, [], 0, ""), 0, "no stage on this rank")
        return with_every_peak(report)

    # -- snapshots ---------------------------------------------------------------------------------------
    # NOTE: the format is ParallelModule's (``model.<name>``, ``optim.<name>.<key>``, scalars by the index of
    # the parameter in ``model.named_parameters()``), each tensor on the (dp, tp) mesh of the stage that owns
    # it (``B`` over dp, its own layout over tp), so a pipeline's snapshot loads into any plan of the same
    # model and the other way round.
    def _named_state(self) -> tuple[dict[str, GlobalTensor], dict[str, Any]]:
        locals_: dict[str, torch.Tensor] = {
            **{n: local(p).detach() for n, p in self.named.items()},
            **{n: b for n, b in self.module.named_buffers()},
        }
        names = list(self.named)
        sd = self.optimizer.state_dict() if self.optimizer is not None else {"state": {}, "param_groups": []}
        mine: dict[str, dict[str, Any]] = {}  # optimizer state of the parameters this stage owns
        for i, entries in sd["state"].items():
            name = names[i]
            if self._owner_stage(name) == self.stage:
                p = self.named[name]  # state shaped like a parameter's shard is that parameter's layout
                mine[name] = {
                    k: (list(p.shape if v.shape == local(p).shape else v.shape), str(v.dtype))
                    if isinstance(v, torch.Tensor) and v.dim() > 0
                    else float(v)
                    for k, v in entries.items()
                }
        every: list[Any] = [None] * self.mesh.size
        dist.all_gather_object(every, (mine, sd["param_groups"]), group=group_for(self.mesh.ranks).group)
        tensors: dict[str, GlobalTensor] = {}
        keys = [(n, "model." + n) for n in [*self.param_order, *self._buffer_names()]]
        for name, key in keys:
            shape, dtype = self.state_meta[name]
            tensors[key] = self._global(name, locals_.get(name), shape, dtype)
        scalars: dict[str, float] = {}
        by_name = {n: i for i, n in enumerate(self.param_order)}
        state = {names[i]: entries for i, entries in sd["state"].items()}
        for rank_state, _ in every:
            for name, entries in rank_state.items():
                for k, v in entries.items():
                    if isinstance(v, float):
                        scalars[f"{by_name[name]}.{k}"] = v
                    else:
                        held = state[name][k].detach() if name in state else None
                        dtype = getattr(torch, v[1].replace("torch.", ""))
                        tensors[f"optim.{name}.{k}"] = self._global(name, held, torch.Size(v[0]), dtype)
        groups: list[dict[str, Any]] = next((g for _, g in every if g), [])
        if len(groups) > 1:
            raise ValueError("pipeline snapshots support optimizers with one parameter group")
        groups = [{**g, "params": list(range(len(self.param_order)))} for g in groups]
        aliases = {n: c for n, c in self.canonical.items() if n != c}
        meta = {"step": self.steps, "param_groups": groups, "optim_scalars": scalars, "aliases": aliases}
        meta["rng"] = rng_states()
        return tensors, meta

    def _buffer_names(self) -> list[str]:
        params = set(self.canonical)
        return [n for n in self.state_meta if n not in params]

    def _global(self, name: str, piece: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype) -> GlobalTensor:
        """``name``'s tensor as a GlobalTensor on its owner stage's ``(dp, tp)`` mesh (empty elsewhere):
        ``B`` over dp, and over tp as the parameter is laid out there."""
        owner = self._owner_stage(name)
        if piece is None or owner != self.stage:
            piece = torch.empty(0, dtype=dtype)
        return wrap(piece, self.flat[owner], (B, self.layouts[owner].get(name, B)), shape)

    def load(self, directory: str) -> None:
        """Load a snapshot of this model saved by any plan (pipelined or not, any mesh) into the stages."""
        self.wait_save()
        index = read_index(directory)
        stage_mesh, layouts = self.flat[self.stage], self.layouts[self.stage]
        targets: dict[str, GlobalTensor] = {}
        for name, p in self.named.items():
            targets["model." + name] = wrap(local(p).data, stage_mesh, (B, layouts.get(name, B)), p.shape)
        for name, b in self.module.named_buffers():
            targets["model." + name] = wrap(b, stage_mesh, (B, B), b.shape)
        names = list(self.named)
        state: dict[int, dict[str, Any]] = {}
        for full in index["tensors"]:
            if full.startswith("optim."):
                pname, key = full[len("optim.") :].rsplit(".", 1)
                if pname in self.named:
                    p = self.named[pname]
                    piece = torch.empty_like(local(p).data)
                    targets[full] = wrap(piece, stage_mesh, (B, layouts.get(pname, B)), p.shape)
                    state.setdefault(names.index(pname), {})[key] = piece
        meta = load_checkpoint(directory, targets if self.inside else {})
        by_index = dict(enumerate(self.param_order))
        for ik, value in meta["optim_scalars"].items():
            i, key = ik.split(".", 1)
            name = by_index[int(i)]
            if name in self.named:
                state.setdefault(names.index(name), {})[key] = torch.tensor(value)
        if self.optimizer is not None:
            groups = meta["param_groups"]
            if len(groups) != 1:
                raise CheckpointError(f"checkpoint {directory} has {len(groups)} parameter groups; pipelines take one")
            group = {**groups[0], "params": list(range(len(self.params)))}
            self.optimizer.load_state_dict({"state": state, "param_groups": [group]})
        self.steps = int(meta["step"])
        restore_rng(meta.get("rng"))

    def _owner_stage(self, key: str) -> int:
        for s, names in enumerate(self.holders):
            if key in names:
                return s
        raise KeyError(f"{key!r} is in no stage")

    def explain(self) -> str:
        """Stages, their parameters, the schedule of each stage and the expected bubble, for people."""
        p, m = self.stages, self._pipeline.micro_batches
        over = "own meshes" if self._pipeline.stage_meshes else f"mesh axis {self._pipeline.axis!r}"
        lines = [
            f"PipelineModule: {p} stage(s) over {over} of {self.mesh}, each data parallel over its rows of ranks "
            f"(and tensor parallel along them under a tp axis), "
            f"{m} micro-batch(es), schedule {self._pipeline.schedule!r}",
            f"split before: {self.split.split_points or '(one stage)'}; idle fraction with equal stages "
            f"(p-1)/(m+p-1) = {bubble(p, m):.3f}",
        ]
        for s in range(p):
            order = stage_order(self._pipeline.schedule, s, p, m)
            count, n = self.sizes[s]
            lines.append(
                f"  stage {s} on ranks {list(self.stage_ranks[s])} ({len(self.grids[s])} dp x {len(self.grids[s][0])} tp"
                f"{', ' + str(sum(is_split(v) for v in self.layouts[s].values())) + ' split' if self.layouts[s] else ''}): "
                f"{count} tensors, {n} parameters, "
                f"{in_flight(order)} micro-batch(es) in flight: {' '.join(map(repr, order))}"
            )
        for b, (count, moves) in sorted(self.crossing_notes.items()):
            shown = ", ".join(f"{a}->{c} {n} row(s)" for a, c, n in moves[:8]) + (" ..." if len(moves) > 8 else "")
            lines.append(
                f"  stage {b} -> {b + 1}: {count} tensor(s) per micro-batch, (S(0), B) over each side's (dp, tp) "
                f"ranks, moved by the cross-mesh plan (gradients back by its reverse); micro-batch 0: {shown}"
            )
        for name, stages in self.split.tied.items():
            lines.append(f"  {name} is held by stages {list(stages)}; their gradients are summed")
        split = [s for s in range(p) if self._splits_stage(s)]
        if split:
            lines.append(
                f"  stage(s) {split}: the last backward runs in two passes, its inputs' gradients sent before its "
                "weights' are computed (W in traces)"
            )
        if self.tp_mesh is not None and self.inside:  # this rank's stage program: what it communicates
            micro = self._micro_batches([_plain(x) for x in self.example_inputs])[0][0]
            counts: dict[tuple[str, str], int] = {}
            for c in self._program(micro).program.collectives:
                phase = "forward" if c.phase == "forward" else "backward"
                what = "gradient bucket all_reduce" if c.plan is None else c.route
                counts[(phase, what)] = counts.get((phase, what), 0) + 1
            said = "; ".join(
                f"{phase}: " + ", ".join(f"{n} x {what}" for (ph, what), n in counts.items() if ph == phase)
                for phase in ("forward", "backward")
                if any(ph == phase for ph, _ in counts)
            )
            lines.append(
                f"  stage {self.stage} runs as a lowered program on rank {world()[0]}'s shards, per micro-batch: "
                f"{said or 'no communication'}"
            )
            if self.partial:
                lines.append(
                    f"  stage {self.stage}: {len(self.partial)} replicated parameters' gradients stay partial sums "
                    f"over tp through the micro-batches, then one all_reduce over the stage's {len(self.stage_ranks[self.stage])} ranks"
                )
        return "\n".join(lines)


def _stages(mesh: Mesh, pipeline: Pipeline) -> list[Mesh]:
    """Each stage's mesh: the given stage meshes, or the slices of ``mesh`` at each coordinate of the
    pipeline axis (collective: makes every stage's mesh)."""
    if pipeline.stage_meshes is not None:
        meshes = list(pipeline.stage_meshes)
        seen: dict[int, int] = {}
        for s, m in enumerate(meshes):
            if m.device_type != mesh.device_type:
                raise ValueError(f"stage mesh {s} {m} is on {m.device_type!r} but the mesh is on {mesh.device_type!r}")
            for r in m.ranks:
                if r in seen:
                    raise ValueError(f"rank {r} is in stage meshes {seen[r]} and {s}: give each stage its own ranks")
                seen[r] = s
        if set(seen) != set(mesh.ranks):
            raise ValueError(
                f"the stage meshes hold ranks {sorted(seen)} but the mesh {mesh} holds {list(mesh.ranks)}: "
                "give sf.compile the mesh of all the stages' ranks, each in exactly one stage mesh"
            )
        return meshes
    pp = mesh.axis_index(pipeline.axis)
    others = [a for a in range(mesh.ndim) if a != pp]
    return [
        Mesh(
            mesh.device_type,
            tuple(mesh.shape[a] for a in others) or (1,),
            names=tuple(mesh.names[a] for a in others) or ("replica",),
            ranks=[r for r in mesh.ranks if mesh.coord_of(r)[pp] == s],
        )
        for s in range(mesh.shape[pp])
    ]


def _grid(stage: Mesh, s: int, strategy: str) -> list[list[int]]:
    """The ranks of a stage as ``grid[dp][tp]``: the tensor-parallel axis (``"tp"``, or the only axis of a
    1-d stage mesh under ``strategy="tp"``) and every other axis data parallel, in mesh order."""
    tp: int | None = None
    if strategy in ("tp", "hybrid"):
        if "tp" in stage.names:
            tp = stage.names.index("tp")
        elif strategy == "tp" and stage.ndim == 1:
            tp = 0
        else:
            raise ValueError(
                f"strategy {strategy!r} with a pipeline splits each stage over its 'tp' axis; stage {s}'s mesh "
                f"{stage} has none: name one axis of each stage 'tp' (the others are data parallel)"
            )
    rows: dict[tuple[int, ...], list[int]] = {}
    for r in stage.ranks:
        coord = stage.coord_of(r)
        rows.setdefault(tuple(c for a, c in enumerate(coord) if a != tp), []).append(r)
    return list(rows.values())


def _batched(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() > 0


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a dim 0 to cut rows from (a 0-d tensor as one row; a view, so receiving into it fills ``t``)."""
    return t if t.dim() else t.reshape(1)


def _shape_key(micro: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in micro)


def _share(module: nn.Module, like: nn.Module) -> nn.Module:
    """``module`` (the same stage cut for another shape) with ``like``'s parameters and buffers in place of its own."""
    for name, _ in list(module.named_parameters(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, attr, like.get_parameter(name))
    for name, _ in list(module.named_buffers(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        (module.get_submodule(owner) if owner else module).register_buffer(attr, like.get_buffer(name))
    return module


def _plain(x: Any) -> Any:
    """The full tensor of a GlobalTensor input (a pipeline re-cuts the batch itself), other inputs as given."""
    return x.full() if isinstance(x, GlobalTensor) else x


def _boundaries(split: Split, micro: Sequence[Any]) -> list[Meta]:
    """Shape and dtype of every tensor each stage returns, by running all stages on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    metas: list[Meta] = []
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in micro]
        prev: list[Any] = []
        for s, module in enumerate(split.modules):
            args = [inputs[k] if src == "input" else prev[k] for src, k in split.wiring[s]]
            out = module(*args)
            prev = list(out) if isinstance(out, (tuple, list)) else [out]
            metas.append([(o.shape, o.dtype) for o in prev])
    return metas
