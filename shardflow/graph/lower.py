"""Lower a training step to a static per-rank program of plain tensors and collectives.

Capture: ``make_fx`` traces the forward *and* ``torch.autograd.grad`` of the unmodified model on fake
tensors (AOTAutograd's way to a joint graph; ``torch.export`` has no stable joint API), so the graph holds
the below-autograd ATen ops that eager GlobalTensors see, backward included, and no autograd runs per step.
Layouts: one pass in graph order picks each op's signature from the shared rule registry (``ops.choose``,
priced by boxing) as eager would, and inserts boxing where a producer's layout differs from what a consumer
needs; a value boxed to some layout once is reused (eager would box it again for every consumer).
Code: the pass writes one Python function for this rank, one line per local op or boxing with ``del`` after
a value's last use, and ``exec``s it, so a step costs the ATen calls and collectives, not dispatch.
Gradients that need one all-reduce over one axis go into buckets launched asynchronously right after the
line producing the bucket's last gradient, so communication overlaps the rest of backward (DDP's reducer,
decided at compile time); ZeRO-2's reduce-scatters are packed into buckets the same way. Each bucket (or
group of gradients needing no communication) is then handed to ``ready(...)`` after the last line that
reads its parameters, where the update actors (runtime/updates.py) may change them in place. ZeRO-3
gathers are launched asynchronously while the op before their use computes (a prefetch one op ahead).
With ``arena=True`` the finished lines are placed statically (``place``, graph/arena.py): ops with an ATen
``out=`` overload write into blocks of one arena, reused by lifetime, and the memory timeline counts the arena.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import operator
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from shardflow.boxing import (
    DEFAULT_COST,
    bound_plan,
    can_start,
    estimate_seconds,
    finish_plan,
    plan_boxing,
    reduce_scatter_args,
    start_plan,
)
from shardflow.boxing.plan import COLLECTIVES, Plan
from shardflow.comm.buckets import launch_all_reduce, launch_reduce_scatter, wait_bucket
from shardflow.graph.arena import Arena, assign, check_outside, check_placed, out_overload, select
from shardflow.graph.values import forced_nodes, module_paths, value_keys
from shardflow.ops import LOCALS, PREPARED, WORKSPACE, LocalContext, OpCall, TensorMeta, choose, writes_arg
from shardflow.ops.select import candidates, communicates, reduces_to_split
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, Blocked, NdSbp, P, Placement, S, grad_sbp, is_split
from shardflow.placement.shard import local_shape
from shardflow.runtime.capture_errors import explained
from shardflow.runtime.memory import ProgramMemory
from shardflow.tensor.trace import OpRecord, Record


@dataclass(frozen=True)
class Joint:
    """A traced training step: ``graph(params, buffers, inputs) -> [loss, *grads]``; or a pipeline stage's
    forward and backward: ``graph(params, buffers, inputs, grads_in) -> [*outputs, *grads, *input_grads]``
    (``graph/stage_program.py``), lowered to a forward and a backward function with what the forward saves
    for the backward handed between them."""

    graph: fx.GraphModule
    n_params: int
    n_buffers: int
    grad_of: tuple[int, ...]  # the parameter index of each gradient output (unused parameters get none)
    n_values: int = 1  # forward results first: the loss, or a stage's outputs
    n_grads_in: int = 0  # a stage: the gradients arriving for its outputs, its last placeholders
    n_input_grads: int = 0  # a stage: gradients of its inputs, last in the results


class _Joint(nn.Module):
    """``forward(inputs, names)``: the model's loss and its gradients with respect to the named parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: tuple[Any, ...], names: list[str]) -> list[torch.Tensor | None]:
        loss = self.model(*inputs)
        leaves: list[torch.Tensor] = [functools.reduce(getattr, n.split("."), self.model) for n in names]  # type: ignore[misc]
        return [loss, *torch.autograd.grad(loss, leaves, allow_unused=True)]


def trace_step(model: nn.Module, inputs: Sequence[Any], device: str = "cpu") -> Joint:
    """Trace forward + backward of ``model(*inputs)`` (a scalar loss) with respect to its parameters.

    Parameters, buffers and tensor inputs are replaced by fake tensors of their global shapes (no memory),
    so ``model`` may hold GlobalTensors or real tensors alike; tied parameters stay tied.
    """
    named = dict(model.named_parameters())
    bnamed = dict(model.named_buffers())
    names, bnames = list(named), list(bnamed)
    grad_of: list[int] = []

    def step(ps: list[torch.Tensor], bs: list[torch.Tensor], xs: list[Any]) -> list[torch.Tensor]:
        leaves = [p.detach().requires_grad_(q.requires_grad) for p, q in zip(ps, named.values())]
        wanted = [i for i, p in enumerate(leaves) if p.requires_grad]
        # NOTE: backward runs inside functional_call too: a block under activation checkpointing runs its
        # forward again during backward, and must see the traced parameters then, not the module's own.
        grads = functional_call(
            _Joint(model),
            {**{"model." + n: t for n, t in zip(names, leaves)}, **{"model." + n: b for n, b in zip(bnames, bs)}},
            (tuple(xs), [names[i] for i in wanted]),
        )
        loss, grads = grads[0], grads[1:]
        grad_of[:] = [i for i, g in zip(wanted, grads) if g is not None]
        return [loss.detach(), *[g for g in grads if g is not None]]

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:

        def fake(t: torch.Tensor) -> torch.Tensor:
            return torch.empty(tuple(t.shape), dtype=t.dtype, device=device)

        ps = [fake(p) for p in named.values()]
        bs = [fake(b) for b in bnamed.values()]
        xs = [fake(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    del mode
    stage = f"tracing {type(model).__name__}'s forward and backward on fake tensors"
    with _attention_kernels(device), explained(model, stage), module_paths(model):
        graph = make_fx(step, tracing_mode="fake")(ps, bs, xs)
    value_keys(graph.graph)
    return Joint(graph, len(ps), len(bs), tuple(grad_of))


def _attention_kernels(device: str) -> Any:
    """On CUDA, attention traces to the flash kernel (half precision), the memory-efficient one (any float
    dtype) or plain matmuls and softmax, in torch's order of preference: kernels ops/rules/nn.py has layout
    rules for; not to cuDNN's (its outputs differ by version)."""
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclass(frozen=True)
class _Value:
    """A tensor value of the graph on this rank: its layout and global metadata."""

    sbp: NdSbp
    meta: TensorMeta


@dataclass(frozen=True)
class _Var:
    """A variable of the generated code standing in for a tensor argument."""

    name: str


@dataclass(frozen=True)
class Comm:
    """One communication of the program: where it happens, its route and plan (None: a gradient bucket)."""

    phase: str  # "forward" (up to the loss), "backward", or "after" (loss, gradients once backward ends)
    where: str  # the op needing it, "gradient bucket of N", "loss" or "gradient"
    route: str
    plan: Plan | None


@dataclass(frozen=True)
class Unit:
    """Gradients handed to the update together: a bucket (as its collective's handle) or a group needing none."""

    grads: tuple[int, ...]  # gradient output indices
    bucket: bool


@dataclass
class Program:
    """This rank's step: ``run(args) -> (loss local in B, [synchronised gradient locals])``. A stage's:
    ``run(args) -> ([output locals in B], saved)`` then ``backward(saved, grads_in) -> ([synchronised
    gradient locals], [input gradient locals in B])``."""

    source: str
    run: Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]  # run(args, ready=None)
    checked: Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]  # same, asserting local shapes
    record: Record
    grad_of: tuple[int, ...]
    collectives: list[Comm] = field(default_factory=list)  # every communication, in program order
    cost: float = 0.0  # seconds of this rank's communication per step, by the cost model
    memory: ProgramMemory | None = None
    ran: bool = False  # the first run is the checked one
    # update units in the order the program releases them through ``run(args, ready)``: ``ready(u, handle)``
    # for a gradient bucket (``wait_bucket`` gives its gradients), ``ready(u, (grads...))`` otherwise, and
    # ``ready(None, None)`` once backward is over (the rest is waiting for communication)
    units: list[Unit] = field(default_factory=list)
    release_lines: list[int] = field(default_factory=list)  # per unit: the line it is released after
    backward: Callable[..., Any] | None = None  # a stage's backward (``checked_backward``: asserting shapes)
    checked_backward: Callable[..., Any] | None = None
    saved_bytes: int = 0  # a stage: bytes its forward keeps for its backward (parameters not counted)
    arena: Arena | None = None  # static placement's blocks (graph/arena.py), allocated at the first run


_aten = torch.ops.aten
_ALIASING = {_aten._unsafe_view.default, _aten.view.default, _aten.reshape.default, _aten.expand.default}
_REPLAYED = {_aten.t.default, _aten.transpose.int, _aten.detach.default}  # views without shape arguments
_VIEWS = {_aten.t.default, _aten.transpose.int, _aten.view.default, _aten._unsafe_view.default, _aten.detach.default}


def _skip(unit: int | None, payload: Any) -> None:
    """``ready`` when nobody listens: the program then returns every gradient after its waits."""


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _check(value: torch.Tensor, want: tuple[int, ...], what: str) -> None:
    if tuple(value.shape) != want:
        raise AssertionError(f"layout rule bug: {what} gave a local of shape {tuple(value.shape)}, expected {want}")


def _boxer(mesh: Mesh, rank: int) -> Callable[[torch.Tensor, NdSbp, tuple[int, ...], NdSbp], torch.Tensor]:
    """A local function's conversions (``ctx.box``): each plan bound for ``rank`` at its first use, so later
    steps (and a ``torch.compile`` trace of the program) only run it."""
    bound: dict[Any, Callable[[torch.Tensor], torch.Tensor]] = {}

    def run(local: torch.Tensor, src: NdSbp, shape: tuple[int, ...], dst: NdSbp) -> torch.Tensor:
        key = (tuple(shape), local.dtype, src, dst)
        fn = bound.get(key)
        if fn is None:
            fn = bound[key] = bound_plan(plan_boxing(tuple(shape), local.dtype, mesh, src, mesh, dst), rank)
        return fn(local)

    return run


@dataclass
class _Bucket:
    ranks: tuple[int, ...]
    grads: list[int] = field(default_factory=list)  # gradient output indices
    nbytes: int = 0
    # a reduce-scatter bucket (ZeRO-2): per gradient its split dim and the members' extents; this rank's index
    scatter: list[tuple[int, tuple[int, ...]]] | None = None
    me: int = 0


class _Lowering:
    """One pass over the joint graph for one rank; see the module docstring."""

    def __init__(
        self,
        joint: Joint,
        mesh: Mesh,
        rank: int,
        sbps: Sequence[NdSbp | None],
        bucket_bytes: int,
        reduce_to_split: bool,
        zero_axis: int | None = None,
        grad_sbps: Sequence[NdSbp | None] = (),
        arena: bool | str = False,
        values: Mapping[str, NdSbp] | None = None,
        gathered: Collection[int] | None = None,
    ):
        self.joint, self.mesh, self.rank, self.bucket_bytes = joint, mesh, rank, bucket_bytes
        self.gathered = gathered  # ZeRO-3: which parameters to gather (None: every one split on zero_axis)
        self.forced = forced_nodes(joint.graph.graph, values or {}, mesh)  # the plan's layouts of values
        # static placement (graph/arena.py): ops with an out= overload write into blocks of one arena
        self.arena = arena
        # line -> (variable, out= overload constant, its out arguments, rendered arguments, storage keys, op)
        self.placeable: dict[int, tuple[str, str, tuple[str, ...], str, list[str], str]] = {}
        self.storage_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # key -> local shape, dtype
        self.exact_lines: set[int] = set()  # lines whose results alias their inputs only as recorded in refs
        self.local_lines: dict[int, str] = {}  # lines running a local function (ops/), with the op's name
        self.async_lines: set[int] = set()  # lines launching work that may read their inputs after they return
        self.placed: dict[str, int] = {}  # storage key -> arena block index
        self.arena_plan: Arena | None = None
        self.grad_sbps = list(grad_sbps)  # per parameter: its gradient's layout when not its own (ZeRO-2)
        self.reduce_to_split, self.zero_axis = reduce_to_split, zero_axis
        self.sharded: set[fx.Node] = set()  # ZeRO-3 parameters and their views
        self.coord = mesh.coord_of(rank)
        self.sbps = list(sbps)  # one per placeholder: params, buffers, inputs (None: not a tensor)
        # block counts of Blocked layouts (fused projections): lookahead prices their lifted signatures too
        self.blocks = sorted({p.blocks for sbp in sbps if sbp for p in sbp if isinstance(p, Blocked)})
        self.info: dict[fx.Node, Any] = {}
        self.var: dict[fx.Node, str] = {}
        self.lines: list[tuple[str, list[str], list[str]]] = []  # (code, names it uses, names it defines)
        self.checks: dict[int, str] = {}  # line index -> shape check to add in the checked program
        self.globals: dict[str, Any] = {}
        self.boxed: dict[tuple[fx.Node, NdSbp], str] = {}
        self.record = Record()
        self.collectives: list[Comm] = []
        self.phase = "forward"
        self.consumer_costs: dict[tuple[fx.Node, fx.Node, NdSbp], float] = {}
        self.consumer_shapes: dict[fx.Node, Any] = {}
        self.params: set[fx.Node] = set()  # parameters and views of them: pinned where the strategy put them
        # memory: the storages each variable keeps alive, and every storage's size and what made it
        self.refs: dict[str, list[str]] = {}
        self.storages: dict[str, tuple[int, str]] = {}  # key -> (bytes on this rank, label)
        self.transient: dict[int, int] = {}  # line -> bytes alive only while it runs (collective staging)
        self.bucket_sizes: list[tuple[tuple[int, ...], int]] = []
        self.scatter_seconds = 0.0  # reduce-scatters packed into buckets, priced as the planner prices them
        self.grad_vars: dict[int, str] = {}  # gradient output index -> variable holding its final local
        self.open: dict[tuple[Any, ...], _Bucket] = {}
        self.waits: list[tuple[str, list[int]]] = []
        self.later: list[tuple[int, str, Plan]] = []  # gradients converted after backward
        self.pending: dict[int, str] = {}  # bucketed gradient output index -> its unsynchronised local
        # variables that are a parameter or may share its storage (views, boxed copies: conservative), so
        # an update of that parameter waits for their last use
        self.param_alias: dict[str, frozenset[int]] = {}
        self.readies: dict[int, list[tuple[str, list[str], list[str]]]] = {}  # line -> ready() calls after it
        self.units: list[Unit] = []
        self.release_lines: list[int] = []  # the line after which each unit is released
        # ZeRO-3 prefetch: the ops that gather sharded parameters, in graph order, with the inputs they gather;
        # (op, input) -> the variable holding that input's gathering, launched while the op before computed
        self.gathers: list[tuple[fx.Node, list[fx.Node]]] = []
        self.gather_at: dict[fx.Node, int] = {}
        self.prefetched: dict[tuple[fx.Node, fx.Node], tuple[str, list[fx.Node]]] = {}  # -> (handle, views)
        self.n_vars = 0
        # a stage (``joint.n_grads_in``): its outputs boxed where its forward ends, the line the backward
        # starts at (the gradients arriving), and its inputs' gradient nodes
        self.value_vars: list[str] = []
        self.split_line = -1
        self.input_grads: list[fx.Node] = []

    # -- code generation helpers ------------------------------------------------------------------------
    def new_var(self) -> str:
        self.n_vars += 1
        return f"v{self.n_vars}"

    def const(self, value: Any, hint: str) -> str:
        name = f"_{hint}{len(self.globals)}"
        self.globals[name] = value
        return name

    def render(self, a: Any, used: list[str]) -> str:
        if isinstance(a, _Var):
            used.append(a.name)
            return a.name
        if isinstance(a, fx.Node):
            used.append(self.var[a])
            return self.var[a]
        if isinstance(a, (list, tuple)):
            inner = ", ".join(self.render(x, used) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if a is None or isinstance(a, (bool, int, str)) or (isinstance(a, float) and math.isfinite(a)):
            return repr(a)
        return self.const(a, "c")

    def store(self, var: str, nbytes: int, label: str) -> None:
        """``var`` holds a new storage of ``nbytes`` on this rank."""
        self.storages[var] = (nbytes, f"{label} ({self.phase})")
        self.refs[var] = [var]

    def local_bytes(self, meta: TensorMeta, sbp: NdSbp) -> int:
        return math.prod(local_shape(meta.shape, sbp, self.mesh.shape, self.coord)) * meta.dtype.itemsize

    def emit(self, code: str, used: list[str], defined: Sequence[str] = ()) -> int:
        self.lines.append((code, used, list(defined)))
        return len(self.lines) - 1

    def box(self, node: fx.Node, need: NdSbp, where: str) -> tuple[str, Plan | None]:
        """The variable holding ``node`` in layout ``need`` (boxed once, then reused)."""
        value: _Value = self.info[node]
        if value.sbp == need:
            return self.var[node], None
        key = (node, need)
        if key in self.boxed:
            return self.boxed[key], None
        reused = self.transposed_box(node, need)
        if reused is not None:
            self.boxed[key] = reused
            return reused, None
        name, plan = self.box_from(self.var[node], value.meta, value.sbp, need, where)
        self.boxed[key] = name
        return name, plan

    def transposed_box(self, node: fx.Node, need: NdSbp) -> str | None:
        """``node`` in layout ``need`` as a transpose of its input already boxed to the matching layout, or
        None. Backward reads a partial gradient both as itself and transposed (input and weight gradients
        of a linear); reducing it once and transposing the result saves the second collective."""
        if node.op != "call_function" or node.target not in (_aten.t.default, _aten.transpose.int):
            return None
        src = node.args[0]
        if not isinstance(src, fx.Node) or not isinstance(self.info.get(src), _Value):
            return None
        nd = len(self.info[src].meta.shape)
        if nd < 2:
            return None
        perm = list(range(nd))
        a, b = (0, 1) if node.target is _aten.t.default else (int(node.args[1]) % nd, int(node.args[2]) % nd)  # type: ignore[arg-type]
        perm[a], perm[b] = perm[b], perm[a]

        def back(p: Placement) -> Placement:
            if isinstance(p, S):
                return S(perm[p.dim])
            return Blocked(perm[p.dim], p.blocks) if isinstance(p, Blocked) else p

        src_need = tuple(back(p) for p in need)
        boxed = self.var[src] if self.info[src].sbp == src_need else self.boxed.get((src, src_need))
        if boxed is None:
            return None
        name = self.new_var()
        rest = "" if node.target is _aten.t.default else f", {a}, {b}"
        self.exact_lines.add(self.emit(f"{name} = {self.const(node.target, 'op')}({boxed}{rest})", [boxed], [name]))
        self.refs[name] = list(self.refs.get(boxed, []))  # a view: the boxed source's storage
        if boxed in self.param_alias:
            self.param_alias[name] = self.param_alias[boxed]
        return name

    def box_from(self, src: str, meta: TensorMeta, sbp: NdSbp, need: NdSbp, where: str) -> tuple[str, Plan]:
        """Emit the boxing of variable ``src`` (layout ``sbp``) to ``need`` into a new variable."""
        plan = plan_boxing(meta.shape, meta.dtype, self.mesh, sbp, self.mesh, need)
        name = self.new_var()
        fn = self.const(bound_plan(plan, self.rank), "box")
        line = self.emit(f"{name} = {fn}({src})", [src], [name])
        self.store(name, self.local_bytes(meta, need), f"{where}: input boxed {plan.route}")
        if src in self.param_alias:
            self.param_alias[name] = self.param_alias[src]
        if any(step.kind in COLLECTIVES for step in plan.steps):  # staging: padded or packed copies of the input
            self.transient[line] = self.local_bytes(meta, sbp) + self.gather_staging(plan, meta, need)
        if any(step.kind in COLLECTIVES or step.kind == "send_recv" for step in plan.steps):  # not local-only
            self.collectives.append(Comm(self.phase, where, plan.route, plan))
        return name, plan

    def gather_staging(self, plan: Plan, meta: TensorMeta, need: NdSbp) -> int:
        """Bytes an all-gather in ``plan`` holds for a moment beyond its result: gloo (CPU) stages the whole
        output (an output-sized block per gather). A gather along a dim that is not outermost receives into
        a buffer of blocks (standing in for the result until then), sending a contiguous copy of this
        rank's strided piece, and is assembled by one ``cat`` from the blocks: the larger of the two moments
        (measured: a ZeRO-3 gather of a transposed weight holds blocks, staging and the piece's copy)."""
        gathers = [s for s in plan.steps if s.kind == "all_gather"]
        if not gathers:
            return 0
        out = self.local_bytes(meta, need)
        staging = out if self.mesh.device_type == "cpu" else 0
        shape = local_shape(meta.shape, need, self.mesh.shape, self.coord)
        split = gathers[-1].src[gathers[-1].axis]
        if isinstance(split, S) and math.prod(shape[: split.dim]) != 1:
            return max(staging + self.local_bytes(meta, plan.src_sbp), out)
        return staging

    # -- the pass -----------------------------------------------------------------------------------------
    def run(self) -> Program:
        graph = self.joint.graph.graph
        output = next(n for n in graph.nodes if n.op == "output")
        results: list[fx.Node] = list(output.args[0])  # type: ignore[arg-type]
        n_values, n_grads = self.joint.n_values, len(self.joint.grad_of)
        self.grad_nodes = {n: i for i, n in enumerate(results[n_values : n_values + n_grads])}
        self.want = self.demands(graph)
        values, self.input_grads = results[:n_values], results[n_values + n_grads :]
        # make_fx records the forward up to the loss, then autograd's backward (a stage's trace detaches its
        # outputs as its forward ends)
        last = values[-1]
        if self.joint.n_grads_in == 0 and last.target == torch.ops.aten.detach.default:
            last = last.args[0]  # type: ignore[assignment]
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.sbps):
            raise AssertionError(f"traced step has {len(placeholders)} inputs, expected {len(self.sbps)}")
        names = self.var_of_placeholders(placeholders)
        arriving = names[len(names) - self.joint.n_grads_in :] if self.joint.n_grads_in else []
        names = names[: len(names) - len(arriving)]
        if self.zero_axis is not None:
            self.gathers = self.gathering_ops(graph, placeholders)
            self.gather_at = {node: i for i, (node, _) in enumerate(self.gathers)}
        self.emit(f"{', '.join(names)}{',' if len(names) == 1 else ''} = args", [], names)
        for node in graph.nodes:
            if node.op == "call_function":
                self.call(node)
            elif node.op == "get_attr":
                self.var[node] = self.const(getattr(self.joint.graph, str(node.target)), "attr")
                self.tensor_value(node, node.meta.get("val"), None)
            if node in self.grad_nodes:
                self.gradient_ready(node)
            if node is last:
                if self.joint.n_grads_in:  # a stage's forward ends here: its outputs leave it replicated
                    self.value_vars = [self.box(v, (B,) * self.mesh.ndim, "stage output")[0] for v in values]
                    self.split_line = self.emit(f"{', '.join(arriving)}, = grads_in", [], arriving)
                self.phase = "backward"
        self.phase = "after"
        return self.finish(results[0])

    def demands(self, graph: fx.Graph) -> dict[fx.Node, tuple[Placement | None, ...]]:
        """Layouts later consumers need, known before the forward pass chooses: a gradient split like its
        parameter, carried back through single-input ops (``t``, ``view``) to the op computing it, so
        that op computes it split instead of as partial sums needing a reduce-scatter afterwards.
        Replicated gradients add no demand: their all-reduce runs in a bucket, overlapped."""
        want: dict[fx.Node, tuple[Placement | None, ...]] = {}
        for node, k in self.grad_nodes.items():
            sbp = self.grad_target(self.joint.grad_of[k])
            if any(is_split(p) for p in sbp):
                want[node] = tuple(p if is_split(p) else None for p in sbp)
        for node in reversed(graph.nodes):
            d = want.get(node)
            if d is None or node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            flat, spec = tree_flatten((node.args, node.kwargs))
            where = [i for i, a in enumerate(flat) if isinstance(a, fx.Node) and _is_tensor(a)]
            if len(where) != 1 or len(flat[where[0]].users) != 1 or not _is_tensor(node):
                continue
            src: fx.Node = flat[where[0]]
            meta = TensorMeta(tuple(src.meta["val"].shape), src.meta["val"].dtype)
            flat[where[0]] = meta
            margs, mkwargs = tree_unflatten(flat, spec)
            din: list[Placement | None] = []
            for axis, sigs in enumerate(
                candidates(OpCall(node.target, tuple(margs), dict(mkwargs), (meta,)), self.mesh, blocks=self.blocks)
            ):
                match = next((sig for sig in sigs if sig.outs[:1] == (d[axis],)), None) if d[axis] else None
                if d[axis] is not None and match is None:
                    break
                din.append(match.ins[0] if match else None)
            else:
                if any(p is not None for p in din):
                    want[src] = tuple(din)
        return want

    # -- ZeRO-3 gathers, each launched while the op before it computes ---------------------------------
    def gathering_ops(self, graph: fx.Graph, placeholders: list[fx.Node]) -> list[tuple[fx.Node, list[fx.Node]]]:
        """The ops that will gather sharded parameters (or views of them), in graph order, as ``call`` decides."""
        sharded = {n for n in placeholders[: self.joint.n_params] if n in self.sharded}
        params = set(placeholders[: self.joint.n_params])
        out: list[tuple[fx.Node, list[fx.Node]]] = []
        for node in graph.nodes:
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            flat, _ = tree_flatten((node.args, node.kwargs))
            tensors = [a for a in flat if isinstance(a, fx.Node) and _is_tensor(a)]
            if node.target in _VIEWS:
                if len(tensors) == 1 and tensors[0] in params:
                    params.add(node)
                    if tensors[0] in sharded:
                        sharded.add(node)
                continue
            ins = list(dict.fromkeys(a for a in tensors if a in sharded))
            if ins:
                out.append((node, ins))
        return out

    def gather(self, node: fx.Node, src: fx.Node, meta: TensorMeta, sbp: NdSbp, full: NdSbp) -> str:
        """The variable holding ``src`` gathered for ``node``: the prefetched gathering picked up, or one now."""
        found = self.prefetched.pop((node, src), None)
        if found is None:
            return self.box_from(self.var[src], meta, sbp, full, "ZeRO-3 gather")[0]
        handle, views = found
        name = self.new_var()
        self.emit(f"{name} = {self.const(finish_plan, 'finish')}({handle})", [handle], [name])
        for view in reversed(views):  # the views between the parameter and what the op reads, on the gathered copy
            prev, name = name, self.new_var()
            args = ", ".join([prev, *(repr(a) for a in view.args[1:])])
            self.emit(f"{name} = {self.const(view.target, 'op')}({args})", [prev], [name])
        self.refs[name] = list(self.refs[handle])  # the gathered buffer (or its copy: counted once, as a view)
        if handle in self.param_alias:
            self.param_alias[name] = self.param_alias[handle]
        return name

    def prefetch(self, index: int) -> None:
        """Launch the gathers of the ``index``-th gathering op now, one op ahead of its use, where the plan
        is a single all-gather and its input already exists (a view made later is gathered when used)."""
        if index >= len(self.gathers):
            return
        node, ins = self.gathers[index]
        for src in ins:
            # a view made later (make_fx puts ``t(weight)`` right before its matmul): gather its parameter
            # now and apply the views to the gathered copy at the use (they commute with the gather)
            base, views = src, []
            while base not in self.var and base.target in _REPLAYED and isinstance(base.args[0], fx.Node):
                views.append(base)
                base = base.args[0]
            value = self.info.get(base)
            if base not in self.var or not isinstance(value, _Value) or (node, src) in self.prefetched:
                continue
            full = tuple(B if a == self.zero_axis else q for a, q in enumerate(value.sbp))
            plan = plan_boxing(value.meta.shape, value.meta.dtype, self.mesh, value.sbp, self.mesh, full)
            if not can_start(plan, self.rank):
                continue
            handle = self.new_var()
            fn = self.const(functools.partial(start_plan, plan), "start")
            line = self.emit(f"{handle} = {fn}({self.var[base]})", [self.var[base]], [handle])
            self.async_lines.add(line)  # the gather sends its input after the line returns
            self.store(handle, self.local_bytes(value.meta, full), "ZeRO-3 gather, prefetched")
            self.transient[line] = self.gather_staging(plan, value.meta, full)
            if self.var[base] in self.param_alias:
                self.param_alias[handle] = self.param_alias[self.var[base]]
            self.collectives.append(Comm(self.phase, "ZeRO-3 gather (prefetched)", plan.route, plan))
            self.prefetched[(node, src)] = (handle, views)

    def var_of_placeholders(self, placeholders: list[fx.Node]) -> list[str]:
        self.params.update(placeholders[: self.joint.n_params])
        if self.zero_axis is not None:
            for i, (node, sbp) in enumerate(zip(placeholders[: self.joint.n_params], self.sbps)):
                split = sbp is not None and isinstance(sbp[self.zero_axis], S)
                if (i in self.gathered) if self.gathered is not None else split:
                    self.sharded.add(node)
        names = []
        for i, (node, sbp) in enumerate(zip(placeholders, self.sbps)):
            name = self.var[node] = self.new_var()
            if i < self.joint.n_params:
                self.param_alias[name] = frozenset({i})
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                self.info[node] = _Value(sbp or (B,) * self.mesh.ndim, TensorMeta(tuple(val.shape), val.dtype))
            names.append(name)
        return names

    def tensor_value(self, node: fx.Node, val: Any, sbp: NdSbp | None) -> None:
        if isinstance(val, torch.Tensor):
            self.info[node] = _Value(sbp or (B,) * self.mesh.ndim, TensorMeta(tuple(val.shape), val.dtype))

    def call(self, node: fx.Node) -> None:
        func = node.target
        if func is operator.getitem:
            src, index = node.args
            name = self.var[node] = self.new_var()
            self.exact_lines.add(self.emit(f"{name} = {self.var[src]}[{index}]", [self.var[src]], [name]))  # type: ignore[index]
            part = f"{self.var[src]}#{index}"  # type: ignore[index]
            self.refs[name] = [part] if part in self.storages else list(self.refs.get(self.var[src], []))  # type: ignore[index]
            if self.var[src] in self.param_alias:  # type: ignore[index]
                self.param_alias[name] = self.param_alias[self.var[src]]  # type: ignore[index]
            parts = self.info.get(src)  # type: ignore[arg-type]
            if isinstance(parts, list) and parts[index] is not None:  # type: ignore[index]
                self.info[node] = parts[index]  # type: ignore[index]
            return
        if not isinstance(func, torch._ops.OpOverload):
            raise ValueError(f"cannot lower {node.format_node()}: only ATen ops are supported in a training step")
        flat, spec = tree_flatten((node.args, node.kwargs))
        where = [i for i, a in enumerate(flat) if isinstance(a, fx.Node) and isinstance(self.info.get(a), _Value)]
        val = node.meta.get("val")
        wanted: tuple[TensorMeta, Sequence[Placement | None]] | None = None
        if node in self.forced and isinstance(val, torch.Tensor):
            wanted = (TensorMeta(tuple(val.shape), val.dtype), self.forced[node])
        elif node in self.want and isinstance(val, torch.Tensor):
            wanted = (TensorMeta(tuple(val.shape), val.dtype), self.want[node])
        out_flat = [val] if isinstance(val, torch.Tensor) else tree_flatten(val)[0]
        out_metas = [TensorMeta(tuple(o.shape), o.dtype) if isinstance(o, torch.Tensor) else None for o in out_flat]
        name = self.var[node] = self.new_var()
        if not where:  # a factory (arange, a mask): computed the same on every rank, so B
            used: list[str] = []
            args = [self.render(a, used) for a in node.args] + [
                f"{k}={self.render(v, used)}" for k, v in node.kwargs.items()
            ]
            self.exact_lines.add(self.emit(f"{name} = {self.const(func, 'op')}({', '.join(args)})", used, [name]))
            self.outputs(node, [(B,) * self.mesh.ndim] * sum(m is not None for m in out_metas), out_metas)
            self.op_storage(node, name, None, [(B,) * self.mesh.ndim] * len(out_metas), out_metas)
            return
        values: list[_Value] = [self.info[flat[i]] for i in where]
        metas = tuple(v.meta for v in values)
        meta_flat = list(flat)
        for i, m in zip(where, metas):
            meta_flat[i] = m
        margs, mkwargs = tree_unflatten(meta_flat, spec)
        call = OpCall(func, tuple(margs), dict(mkwargs), metas)
        mutated = (0,) if where[0] == 0 and writes_arg(func, 0) else ()
        current = [v.sbp for v in values]
        # ZeRO-3: a parameter sharded over the data-parallel axis is gathered right before each op that
        # computes with it (views of it stay sharded) and freed after; backward gathers it again
        gathered: dict[int, str] = {}
        if self.zero_axis is not None and func not in _VIEWS:
            for t, i in enumerate(where):
                if flat[i] in self.sharded:
                    full = tuple(B if a == self.zero_axis else q for a, q in enumerate(current[t]))
                    gathered[i] = self.gather(node, flat[i], metas[t], current[t], full)
                    current[t] = full
            if node in self.gather_at:
                self.prefetch(self.gather_at[node] + 1)
        for t, i in enumerate(where):  # a partial sum transposed from one already reduced: take that instead
            if P in current[t] and t not in mutated and i not in gathered:
                whole = tuple(B if p == P else p for p in current[t])
                reused = self.transposed_box(flat[i], whole)
                if reused is not None:
                    self.info[flat[i]], self.var[flat[i]], current[t] = _Value(whole, metas[t]), reused, whole
        after = self.lookahead(node, out_metas)
        pinned = [t for t, i in enumerate(where) if flat[i] in self.params]
        ins, outs = choose(
            call,
            self.mesh,
            current,
            fixed=mutated,
            wanted=wanted,
            after=after,
            reduce_to_split=self.reduce_to_split,
            pinned=pinned,
        )
        if len(where) == 1 and flat[where[0]] in self.params and func in _VIEWS:
            self.params.add(node)  # a view of a parameter is pinned like the parameter
            if flat[where[0]] in self.sharded:
                self.sharded.add(node)
        op_name = str(func)
        record = OpRecord(op_name, tuple(current), ins, outs)
        self.record.ops.append(record)
        local_flat = list(flat)
        for t, (i, need) in enumerate(zip(where, ins)):
            if self.info[flat[i]].sbp != need and i < len(node.args) and writes_arg(func, i):
                raise ValueError(f"{op_name} updates an input in place that would first need boxing to {need}")
            if i in gathered:
                var, plan = gathered[i], None
                if current[t] != need:  # pinned: a local conversion of the gathered copy
                    var, plan = self.box_from(var, metas[t], current[t], need, op_name)
            else:
                var, plan = self.box(flat[i], need, op_name)
            if plan is not None:
                record.boxing.append(plan)
            local_flat[i] = _Var(var)
        if mutated:  # later readers of the mutated value must not reuse copies boxed before the update
            self.boxed = {k: v for k, v in self.boxed.items() if k[0] is not flat[where[0]]}
        largs, lkwargs = tree_unflatten(local_flat, spec)
        used = []
        fn = LOCALS.get(func)
        if fn is not None:
            shapes = tuple(m.shape if m is not None else None for m in out_metas)
            ctx = LocalContext(call, self.mesh, self.coord, ins, outs, shapes, _boxer(self.mesh, self.rank))
            kw = f"{{{', '.join(f'{k!r}: {self.render(v, used)}' for k, v in lkwargs.items())}}}"
            if func in PREPARED:  # what depends only on the context is worked out now, once
                run = self.const(PREPARED[func](ctx), "local")
                code = f"{name} = {run}({self.render(tuple(largs), used)}, {kw})"
            else:
                code = f"{name} = {self.const(fn, 'local')}({self.const(ctx, 'ctx')}, {self.render(tuple(largs), used)}, {kw})"
        else:
            args = [self.render(a, used) for a in largs] + [f"{k}={self.render(v, used)}" for k, v in lkwargs.items()]
            code = f"{name} = {self.const(func, 'op')}({', '.join(args)})"
        line = self.emit(code, used, [name])
        self.exact_lines.add(line)  # aliasing as its schema says (a local function's: checked, see place())
        if fn is not None and func not in _ALIASING and not any(r.alias_info for r in func._schema.returns):
            self.local_lines[line] = op_name
        if fn is not None and func in WORKSPACE:  # the local function's own temporaries, alive while it runs
            self.transient[line] = self.transient.get(line, 0) + WORKSPACE[func](ctx)
        self.outputs(node, list(outs), out_metas)
        first = local_flat[where[0]]
        self.op_storage(node, name, first.name if isinstance(first, _Var) else None, list(outs), out_metas)
        if node in self.forced and outs[0] != self.forced[node]:  # the plan fixes this value's layout
            forced, meta = self.forced[node], self.info[node].meta
            var, plan = self.box_from(name, meta, outs[0], forced, f"{op_name} (forced by the plan)")
            record.boxing.append(plan)
            self.var[node], self.info[node] = var, _Value(forced, meta)
        wants = [
            local_shape(m.shape, s, self.mesh.shape, self.coord) for m, s in zip([m for m in out_metas if m], outs)
        ]
        if fn is None and self.arena:
            self.placeable_op(line, func, name, ", ".join(args), out_metas, wants)
        if isinstance(val, torch.Tensor):
            self.checks[line] = f"_check({name}, {wants[0]!r}, {op_name!r})"
        else:
            tensor_at = [i for i, m in enumerate(out_metas) if m is not None]
            self.checks[line] = "; ".join(f"_check({name}[{i}], {w!r}, {op_name!r})" for i, w in zip(tensor_at, wants))

    def lookahead(
        self, node: fx.Node, out_metas: list[TensorMeta | None]
    ) -> Callable[[tuple[NdSbp, ...]], float] | None:
        """What each choice of output layouts will cost the node's consumers: for every consumer, its
        cheapest signature given that layout and the layouts of its other inputs known so far (one step of
        lookahead; e.g. a reduce-scatter that a column-parallel linear must then all-gather loses to one
        all-reduce)."""
        tensors = [i for i, m in enumerate(out_metas) if m is not None]
        uses: list[tuple[int, fx.Node, fx.Node]] = []  # (tensor output index, consumer, node it reads)
        if _is_tensor(node):
            uses = [(0, user, node) for user in node.users]
        else:
            for item in node.users:
                if item.target is operator.getitem and item.args[1] in tensors:
                    uses += [(tensors.index(item.args[1]), user, item) for user in item.users]  # type: ignore[arg-type]
        if not uses:
            return None

        def cost(outs: tuple[NdSbp, ...]) -> float:
            return sum(self.consumer_cost(user, src, outs[j]) for j, user, src in uses)

        return cost

    def consumer_cost(self, user: fx.Node, src: fx.Node, layout: NdSbp, depth: int = 0) -> float:
        """The cheapest boxing ``user`` needs when ``src`` arrives in ``layout`` (priced quickly, see
        ``estimate_seconds``). Through ops with one tensor input and one output (views, transposes,
        element-wise) it looks on, up to 3 ops deeper: a partial sum that a view passes along is paid for
        where something finally needs it reduced."""
        key = (user, src, layout)
        if key in self.consumer_costs:
            return self.consumer_costs[key]
        best, shape = 0.0, self.consumer_shape(user)
        if shape is not None:
            nodes, metas, combos = shape
            passes_on = len(nodes) == 1 and _is_tensor(user) and depth < 3
            best = math.inf
            for needs, out in combos:
                total = 0.0
                for a, meta, need in zip(nodes, metas, needs):
                    value = self.info.get(a)
                    cur = layout if a is src else (value.sbp if isinstance(value, _Value) else None)
                    if cur is None or cur == need:
                        continue
                    if a in self.params and communicates(cur, need):
                        total = math.inf  # choose() keeps parameters where they are
                        break
                    if not self.reduce_to_split and reduces_to_split(cur, need):
                        total = math.inf  # the policy forbids it here, as choose() will
                        break
                    total += 1e-9 + estimate_seconds(meta.shape, meta.dtype, self.mesh, cur, need)
                if passes_on and total < best and out is not None:
                    total += sum(self.consumer_cost(nxt, user, out, depth + 1) for nxt in user.users)
                best = min(best, total)
        self.consumer_costs[key] = best
        return best

    def consumer_shape(
        self, user: fx.Node
    ) -> tuple[list[fx.Node], list[TensorMeta], list[tuple[tuple[NdSbp, ...], NdSbp | None]]] | None:
        """A consumer's tensor inputs, their metadata and its distinct (input layouts, first output layout)
        signatures; None where lookahead does not apply (no ATen op, no rule, too many signatures)."""
        if user in self.consumer_shapes:
            return self.consumer_shapes[user]
        found = None
        if user.op == "call_function" and isinstance(user.target, torch._ops.OpOverload):
            flat, spec = tree_flatten((user.args, user.kwargs))
            where = [i for i, a in enumerate(flat) if isinstance(a, fx.Node) and _is_tensor(a)]
            metas = [TensorMeta(tuple(flat[i].meta["val"].shape), flat[i].meta["val"].dtype) for i in where]
            nodes = [flat[i] for i in where]
            for i, m in zip(where, metas):
                flat[i] = m
            margs, mkwargs = tree_unflatten(flat, spec)
            try:
                call = OpCall(user.target, tuple(margs), dict(mkwargs), tuple(metas))
                per_axis = candidates(call, self.mesh, blocks=self.blocks)
            except NotImplementedError:  # no rule: the consumer's own choice will say so
                per_axis = []
            if per_axis and math.prod(len(c) for c in per_axis) <= 256:
                combos = {
                    (
                        tuple(tuple(sig.ins[t] for sig in combo) for t in range(len(nodes))),
                        tuple(sig.outs[0] for sig in combo) if combo[0].outs else None,
                    ): None
                    for combo in itertools.product(*per_axis)
                }
                found = (nodes, metas, list(combos))
        self.consumer_shapes[user] = found
        return found

    def op_storage(
        self, node: fx.Node, name: str, first: str | None, outs: list[NdSbp], out_metas: list[TensorMeta | None]
    ) -> None:
        """Record what the op's output holds: its first input's storage for views and in-place ops (their
        schema says the result aliases an argument; ``_unsafe_view`` and the shape-op locals too), else a
        new storage per tensor output, sized by its local shape."""
        func = node.target
        returns = func._schema.returns  # type: ignore[union-attr]
        aliases = func in _ALIASING or any(r.alias_info is not None for r in returns)
        if aliases and first is not None:
            self.refs[name] = list(self.refs.get(first, []))
            if first in self.param_alias:
                self.param_alias[name] = self.param_alias[first]
            return
        tensor_outs = iter(outs)
        label = str(func).replace("aten.", "")
        if isinstance(node.meta.get("val"), torch.Tensor):
            self.store(name, self.local_bytes(out_metas[0], next(tensor_outs)), label)  # type: ignore[arg-type]
            return
        self.refs[name] = []
        for i, m in enumerate(out_metas):
            if m is not None:
                key = f"{name}#{i}"
                self.storages[key] = (self.local_bytes(m, next(tensor_outs)), f"{label} output {i} ({self.phase})")
                self.refs[name].append(key)

    def placeable_op(
        self,
        line: int,
        func: Any,
        name: str,
        args: str,
        out_metas: list[TensorMeta | None],
        shapes: list[tuple[int, ...]],
    ) -> None:
        """Note that ``line`` may write its new storages into arena blocks, when its op has an out= overload."""
        found = out_overload(func)
        if found is None or func in _ALIASING or any(m is None for m in out_metas):
            return
        keys = self.refs.get(name, [])
        if keys != [name] and keys != [f"{name}#{i}" for i in range(len(out_metas))]:
            return
        overload, out_names = found
        if len(out_names) != len(keys):
            return
        for key, shape, meta in zip(keys, shapes, out_metas):
            self.storage_shapes[key] = (tuple(shape), meta.dtype)  # type: ignore[union-attr]
        self.placeable[line] = (name, self.const(overload, "out"), out_names, args, keys, str(func))

    def place(self, kept: Sequence[str]) -> None:
        """Static placement (graph/arena.py): give every placeable storage an arena block, blocks sharing bytes
        where lifetimes do not overlap, and rewrite its line to write there. A storage's lifetime runs to the
        last use of any variable that may hold it: as recorded, and through any line whose aliasing is not
        exactly known (boxing), whose results may hold any storage of its inputs; a local function's result
        is new as its op's schema says (the checked first run asserts it). Inputs of launched work live to
        the end. What the program returns or keeps (``kept``, or hands to ``ready``) is never placed: a
        step's gradients must outlive it."""
        may: dict[str, set[str]] = {}
        last = self.last_uses()
        for i, (_, used, defined) in enumerate(self.lines):
            for d in defined:
                own = set(self.refs.get(d, []))
                if i in self.exact_lines:  # a view inherits what its source may hold besides its own storages
                    extra = {
                        k
                        for u in used
                        if own & set(self.refs.get(u, []))
                        for k in may.get(u, set()) - set(self.refs[u])
                    }
                else:
                    extra = {k for u in used for k in may.get(u, set(self.refs.get(u, [])))}
                may[d] = own | extra
            if i in self.async_lines:
                for u in used:
                    last[u] = len(self.lines)
        ready = [n for calls in self.readies.values() for _, payload, _ in calls for n in payload]
        excluded = {k for v in [*kept, *ready] for k in may.get(v, set(self.refs.get(v, [])))}
        lines = [i for i, (_, _, _, _, keys, _) in self.placeable.items() if not excluded & set(keys)]
        span = self.spans(may, last)
        blocks = {key: (self.storages[key][0], *span[key]) for i in lines for key in self.placeable[i][4]}
        # what stays with the allocator, line by line: the arena is held whole, so only blocks that lower
        # the peak of both together are placed (an op's outputs all, or none)
        base = [0] * (len(self.lines) + 1)
        for key, (a, b) in self.spans(self.refs, self.last_uses()).items():
            if key not in blocks:
                base[a] += self.storages[key][0]
                base[b + 1] -= self.storages[key][0]
        base = list(itertools.accumulate(base))[: len(self.lines)]
        for i, staging in self.transient.items():
            base[i] += staging
        chosen = set(blocks) if self.arena == "all" else select(blocks, base)
        lines = [i for i in lines if all(key in chosen for key in self.placeable[i][4])]
        if not lines:
            return
        blocks = {key: blocks[key] for i in lines for key in self.placeable[i][4]}
        offsets, nbytes = assign(blocks)
        order = sorted(blocks, key=lambda k: (offsets[k], k))
        self.placed = {key: j for j, key in enumerate(order)}
        self.arena_plan = Arena(nbytes, [(offsets[k], *self.storage_shapes[k]) for k in order])
        for i in lines:
            name, overload, out_names, args, keys, op = self.placeable[i]
            outs = ", ".join(f"{o}=_A[{self.placed[k]}]" for o, k in zip(out_names, keys))
            _, used, defined = self.lines[i]
            self.lines[i] = (f"{name} = {overload}({args}{', ' if args else ''}{outs})", used, defined)
            blocks_of = ", ".join(f"_A[{self.placed[k]}]" for k in keys)
            target = blocks_of if len(keys) == 1 else f"({blocks_of},)"
            check = f"_placed({name}, {target}, {op!r})"
            self.checks[i] = f"{self.checks[i]}; {check}" if i in self.checks else check
        for i, op in self.local_lines.items():  # a local function's result is new, as its op's schema says
            name = self.lines[i][2][0]
            check = f"_outside({name}, _arena, {op!r})"
            self.checks[i] = f"{self.checks[i]}; {check}" if i in self.checks else check

    def outputs(self, node: fx.Node, outs: list[NdSbp], out_metas: list[TensorMeta | None]) -> None:
        if len(outs) != sum(m is not None for m in out_metas):
            raise AssertionError(f"layout rule of {node.target} gave {len(outs)} output layouts")
        it = iter(outs)
        values = [_Value(next(it), m) if m is not None else None for m in out_metas]
        if isinstance(node.meta.get("val"), torch.Tensor):
            self.info[node] = values[0]
        else:
            self.info[node] = values

    # -- gradients ----------------------------------------------------------------------------------------
    def grad_target(self, param: int) -> NdSbp:
        """The layout parameter ``param``'s gradient is returned in: its own with P as B, unless overridden."""
        if param < len(self.grad_sbps) and self.grad_sbps[param] is not None:
            return self.grad_sbps[param]  # type: ignore[return-value]
        return grad_sbp(self.sbps[param])  # type: ignore[arg-type]

    def gradient_ready(self, node: fx.Node) -> None:
        k = self.grad_nodes[node]
        param = self.joint.grad_of[k]
        value: _Value = self.info[node]
        want = self.grad_target(param)
        if value.sbp == want:
            self.grad_vars[k] = self.var[node]
            return
        plan = plan_boxing(value.meta.shape, value.meta.dtype, self.mesh, value.sbp, self.mesh, want)
        # partial sums over some axes, wanted replicated there and unchanged elsewhere: one all-reduce over
        # the slice spanning those axes, whatever route the planner would take for the tensor alone
        axes = tuple(a for a, (src, dst) in enumerate(zip(value.sbp, want)) if src != dst)
        summed = all(value.sbp[a] == P and want[a] == B for a in axes)
        scatter = None if summed else reduce_scatter_args(plan, self.rank)
        if scatter is not None:  # partial sums wanted split (ZeRO-2): reduce-scattered in buckets, overlapped
            members, dim, sizes, me = scatter
            self.record.other.append(("gradient bucket", plan, "reduce_scatter, packed with others"))
            self.scatter_seconds += plan.seconds
            key = (members, value.meta.dtype, "scatter")
            bucket = self.open.setdefault(key, _Bucket(members, scatter=[], me=me))
            assert bucket.scatter is not None
            bucket.grads.append(k)
            bucket.scatter.append((dim, sizes))
            shape = local_shape(value.meta.shape, want, self.mesh.shape, self.coord)
            bucket.nbytes += (
                math.prod(shape[:dim]) * max(sizes) * math.prod(shape[dim + 1 :]) * value.meta.dtype.itemsize
            )
            self.pending[k] = self.var[node]
            if bucket.nbytes * len(members) >= self.bucket_bytes:
                self.launch(self.open.pop(key))
            return
        if not summed or math.prod(self.mesh.shape[a] for a in axes) == 1:
            self.later.append((k, self.var[node], plan))
            return
        names = ", ".join(self.mesh.names[a] for a in axes)
        self.record.other.append(("gradient bucket", plan, f"one all_reduce over ({names})"))
        ranks = self.mesh.slice_over(axes, self.rank)
        summing = (ranks, value.meta.dtype, "sum")
        bucket = self.open.setdefault(summing, _Bucket(ranks))
        bucket.grads.append(k)
        shape = local_shape(value.meta.shape, value.sbp, self.mesh.shape, self.coord)
        bucket.nbytes += math.prod(shape) * value.meta.dtype.itemsize
        self.pending[k] = self.var[node]
        if bucket.nbytes >= self.bucket_bytes:
            self.launch(self.open.pop(summing))

    def launch(self, bucket: _Bucket) -> None:
        handle = self.new_var()
        grads = [self.pending[k] for k in bucket.grads]
        if bucket.scatter is not None:
            dims, sizes = [d for d, _ in bucket.scatter], [n for _, n in bucket.scatter]
            fn = self.const(functools.partial(launch_reduce_scatter, bucket.ranks, dims, sizes, bucket.me), "launch")
            line = self.emit(f"{handle} = {fn}({', '.join(grads)})", grads, [handle])
            self.exact_lines.add(line)  # the gradients are packed (copied) into the collective's own buffer
            # the packed pieces of every member stay with the collective until it completes, and on CPU gloo
            # reduce-scatters a copy of them: both live as long as this rank's pieces, until the wait
            packed = bucket.nbytes * len(bucket.ranks) * (2 if self.mesh.device_type == "cpu" else 1)
            label = f"gradient pieces of a reduce-scatter bucket of {len(grads)}, with its packed send buffers"
            self.store(handle, bucket.nbytes + packed, label)
            where, route = f"gradient reduce-scatter bucket of {len(grads)}", "reduce_scatter"
        else:
            self.bucket_sizes.append((bucket.ranks, bucket.nbytes))
            fn = self.const(functools.partial(launch_all_reduce, bucket.ranks), "launch")
            self.exact_lines.add(self.emit(f"{handle} = {fn}({', '.join(grads)})", grads, [handle]))  # copied in
            self.store(handle, bucket.nbytes, f"gradient bucket of {len(grads)}")
            where, route = f"gradient bucket of {len(grads)}", "all_reduce"
        self.collectives.append(Comm(self.phase, where, route, None))
        self.waits.append((handle, bucket.grads))

    def finish(self, loss: fx.Node) -> Program:
        for key in list(self.open):
            self.launch(self.open.pop(key))
        if self.joint.n_grads_in:  # a stage: its inputs' gradients leave it replicated, as its inputs came
            loss_var = ""
            input_grad_vars = [self.box(g, (B,) * self.mesh.ndim, "input gradient")[0] for g in self.input_grads]
        else:
            loss_var, plan = self.box(loss, (B,) * self.mesh.ndim, "loss")
            if plan is not None:
                self.record.other.append(("loss", plan, None))
        for k, var, plan in self.later:
            name = self.new_var()
            self.emit(f"{name} = {self.const(bound_plan(plan, self.rank), 'box')}({var})", [var], [name])
            meta = TensorMeta(plan.shape, plan.dtype)
            self.store(name, self.local_bytes(meta, plan.dst_sbp), f"gradient to its layout by {plan.route}")
            self.record.other.append(("gradient", plan, None))
            if any(step.kind in COLLECTIVES or step.kind == "send_recv" for step in plan.steps):
                self.collectives.append(Comm(self.phase, "gradient", plan.route, plan))
            self.grad_vars[k] = name
        self.release_units()
        self.emit("ready(None, None)", [])  # backward is over: what follows waits for communication
        for handle, ks in self.waits:
            names = [self.new_var() for _ in ks]
            self.exact_lines.add(self.emit(f"{', '.join(names)}, = _wait({handle})", [handle], names))
            for n in names:
                self.refs[n] = [handle]
            self.grad_vars.update(zip(ks, names))
        grads = [self.grad_vars[k] for k in range(len(self.grad_nodes))]
        if self.joint.n_grads_in:
            self.emit(f"return [{', '.join(grads)}], [{', '.join(input_grad_vars)}]", [*grads, *input_grad_vars])
            kept = [*grads, *input_grad_vars, *self.value_vars, *self.saved()]
            returned = ["", *grads]
        else:
            self.emit(f"return {loss_var}, [{', '.join(grads)}]", [loss_var, *grads])
            kept = returned = [loss_var, *grads]
        if self.arena:
            plain, lines, checks = self.timeline(returned).peak, list(self.lines), dict(self.checks)
            self.place(kept)
            # ``select`` judges by an estimate (lifetimes through boxing counted long, the arena as its
            # densest line): placement that still raises the peak is undone for ``arena=True``
            if self.arena is True and self.arena_plan is not None and self.timeline(returned).peak > plain:
                self.lines, self.checks, self.placed, self.arena_plan = lines, checks, {}, None
        self.memory = self.timeline(returned)
        fast, checked = self.source(False), self.source(True)
        env = {"_wait": wait_bucket, "_check": _check, "_skip": _skip, "_placed": check_placed, **self.globals}
        if self.arena_plan is not None:
            env |= {"_A": self.arena_plan.views, "_fill": self.arena_plan.fill, "_arena": self.arena_plan}
            env |= {"_outside": check_outside}
        exec(compile(fast, "<shardflow step>", "exec"), env)  # noqa: S102 - our own generated code
        run, backward = env["step"], env.get("backward")
        exec(compile(checked, "<shardflow checked step>", "exec"), env)  # noqa: S102
        return Program(
            fast,
            run,
            env["step"],
            self.record,
            self.joint.grad_of,
            self.collectives,
            self.cost(),
            self.memory,
            units=list(self.units),
            release_lines=list(self.release_lines),
            backward=backward,
            checked_backward=env.get("backward"),
            saved_bytes=self.saved_bytes(),
            arena=self.arena_plan,
        )

    def release_units(self) -> None:
        """Group gradients into update units and say, in the code, where each may be handed on.

        A unit is a gradient bucket (handed on as its all-reduce handle) or the gradients that need no
        communication becoming final on one line. It is released after the later of the line that makes it
        and the last line that reads any of its parameters (or a view or copy of them): from there on an
        actor may update those parameters in place while the rest of backward runs."""
        last_param: dict[int, int] = {}
        made: dict[str, int] = {}
        for i, (_, used, defined) in enumerate(self.lines):
            for name in defined:
                made.setdefault(name, i)
            for name in [*used, *defined]:
                for param in self.param_alias.get(name, ()):
                    last_param[param] = i
        grad_of = self.joint.grad_of

        def release(var: str, ks: Sequence[int]) -> int:
            return max([made[var], *(last_param.get(grad_of[k], 0) for k in ks)])

        entries: list[tuple[int, tuple[int, ...], list[str], bool]] = []
        for handle, ks in self.waits:
            entries.append((release(handle, ks), tuple(ks), [handle], True))
        in_buckets = {k for _, ks in self.waits for k in ks}
        direct: dict[int, list[int]] = {}  # release line -> gradients needing no communication
        for k in range(len(self.grad_nodes)):
            if k not in in_buckets:
                direct.setdefault(release(self.grad_vars[k], [k]), []).append(k)
        for line, group in direct.items():
            entries.append((line, tuple(group), [self.grad_vars[k] for k in group], False))
        for line, unit, payload, bucket in sorted(entries, key=lambda e: e[0]):
            arg = payload[0] if bucket else f"({', '.join(payload)},)"
            self.readies.setdefault(line, []).append((f"ready({len(self.units)}, {arg})", payload, []))
            self.units.append(Unit(unit, bucket))
            self.release_lines.append(line)

    def cost(self) -> float:
        """Communication seconds per step by the cost model: every boxing plan, every gradient bucket."""
        total = sum(c.plan.seconds for c in self.collectives if c.plan is not None) + self.scatter_seconds
        for ranks, nbytes in self.bucket_sizes:
            total += DEFAULT_COST.collective("all_reduce", len(ranks), nbytes)
        return total

    def merged(self) -> list[tuple[str, list[str], list[str], int | None]]:
        """The program's lines with the ``ready`` calls in place: (code, uses, defines, index in ``lines``)."""
        out: list[tuple[str, list[str], list[str], int | None]] = []
        for i, (code, used, defined) in enumerate(self.lines):
            out.append((code, used, defined, i))
            out += [(c, u, d, None) for c, u, d in self.readies.get(i, [])]
        return out

    def last_uses(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for i, (_, used, defined) in enumerate(self.lines):
            for name in [*defined, *used]:  # a value never used dies where it is made
                last[name] = i
        return last

    def timeline(self, returned: list[str]) -> ProgramMemory:
        """Bytes this rank's program holds line by line (storages from their line to the last use of any
        variable that refers to them), its peak, what is alive there, and what the program returns."""
        span = self.spans(self.refs, self.last_uses())
        for key in self.placed:  # in the arena, held whole from the first run on
            span.pop(key, None)
        arena = self.arena_plan.nbytes if self.arena_plan is not None else 0
        delta = [0] * (len(self.lines) + 1)
        delta[0] = arena
        for key, (a, b) in span.items():
            delta[a] += self.storages[key][0]
            delta[b + 1] -= self.storages[key][0]
        live, peak, at = 0, 0, 0
        for i in range(len(self.lines)):
            live += delta[i]
            if live + self.transient.get(i, 0) > peak:
                peak, at = live + self.transient.get(i, 0), i
        alive = sorted(
            ((self.storages[k][0], self.storages[k][1]) for k, (a, b) in span.items() if a <= at <= b), reverse=True
        )
        if arena:
            alive.append((arena, f"arena of {len(self.placed)} temporaries placed by lifetime (graph/arena.py)"))
            alive.sort(reverse=True)
        if self.transient.get(at):
            alive.append(
                (self.transient[at], "temporaries of the op there (its own, or a collective's staging copies)")
            )
        kept = {k for v in returned[1:] for k in self.refs.get(v, [])}
        ends = [0] * len(self.lines)
        for key, (_, b) in span.items():
            ends[b] += self.storages[key][0]
        live_at, running = [], 0  # after each line, once what dies there is freed (where updates run)
        for i in range(len(self.lines)):
            running += delta[i]
            live_at.append(running - ends[i])
        gradients = sum(self.storages[k][0] for k in kept)
        return ProgramMemory(peak, alive, gradients, self.lines[at][0], tuple(live_at), arena)

    def spans(self, holds: dict[str, Any], last: dict[str, int]) -> dict[str, tuple[int, int]]:
        """Each storage's first and last line: from the line making the first variable that holds it (per
        ``holds``) to the last use (per ``last``) of any of them."""
        first: dict[str, int] = {}
        for i, (_, _, defined) in enumerate(self.lines):
            for name in defined:
                first.setdefault(name, i)
        span: dict[str, tuple[int, int]] = {}
        for var, keys in holds.items():
            if var not in first:
                continue
            a, b = first[var], last.get(var, first[var])
            for key in keys:
                lo, hi = span.get(key, (a, b))
                span[key] = (min(lo, a), max(hi, b))
        return span

    def saved(self) -> list[str]:
        """A stage's variables made by its forward and used by its backward (what the forward returns)."""
        lines = self.merged()
        k = next(i for i, line in enumerate(lines) if line[3] == self.split_line)
        made = {n for _, _, defined, _ in lines[:k] for n in defined}
        return sorted({n for _, used, _, _ in lines[k:] for n in used if n in made}, key=lambda n: int(n[1:]))

    def saved_bytes(self) -> int:
        """Bytes of the storages a stage's forward keeps for its backward (views of parameters hold none)."""
        if not self.joint.n_grads_in:
            return 0
        keys = {key for name in self.saved() for key in self.refs.get(name, [])}
        return sum(self.storages[key][0] for key in keys)

    def source(self, checked: bool) -> str:
        lines = self.merged()
        fill = ["if not _A: _fill(args)"] if self.arena_plan is not None else []
        if not self.joint.n_grads_in:
            return _function("def step(args, ready=_skip):", lines, self.checks if checked else {}, fill)
        # a stage: the forward returns its outputs and what the backward needs, which takes them back
        k = next(i for i, line in enumerate(lines) if line[3] == self.split_line)
        saved = self.saved()
        keep = f"({', '.join(saved)}{',' if len(saved) == 1 else ''})"
        outs = f"return [{', '.join(self.value_vars)}], {keep}"
        forward = [*lines[:k], (outs, [*self.value_vars, *saved], [], None)]
        backward = [(f"{keep} = saved", [], saved, None), *lines[k:]]
        checks = self.checks if checked else {}
        return _function("def step(args, ready=_skip):", forward, checks, fill) + _function(
            "def backward(saved, grads_in, ready=_skip):",
            backward,
            checks,
            [f.replace("args", "grads_in") for f in fill],
        )


def _function(
    head: str,
    lines: Sequence[tuple[str, list[str], list[str], int | None]],
    checks: dict[int, str],
    prologue: Sequence[str] = (),
) -> str:
    """The code of one generated function: its lines, each variable deleted after its last use."""
    last: dict[str, int] = {}
    for i, (_, used, defined, _) in enumerate(lines):
        for name in [*defined, *used]:
            last[name] = i
    out = [head, *("    " + p for p in prologue)]
    for i, (code, used, defined, origin) in enumerate(lines):
        out.append("    " + code)
        if origin in checks:
            out.append("    " + checks[origin])
        dead = sorted({n for n in [*used, *defined] if last[n] == i and n[0] == "v"})  # not constants
        if dead and not code.startswith("return"):
            out.append(f"    del {', '.join(dead)}")
    return "\n".join(out) + "\n"


def lower(
    joint: Joint,
    mesh: Mesh,
    rank: int,
    sbps: Sequence[NdSbp | None],
    bucket_bytes: int = 4 * 2**20,
    zero_axis: int | None = None,
    grad_sbps: Sequence[NdSbp | None] = (),
    arena: bool | str = False,
    values: Mapping[str, NdSbp] | None = None,
    gathered: Collection[int] | None = None,
) -> Program:
    """This rank's program for ``joint`` with one layout per placeholder (params, buffers, inputs).

    Op-by-op choices cannot see what a layout costs later, in backward: reduce-scattering partial sums
    into a batch split looks cheaper than an all-reduce in forward, then costs all-to-alls, gathers and
    reduced gradients of replicated parameters in backward. So the pass runs under two policies (partial
    sums may be reduce-scattered into splits, or only reduced to ``B``) and the program whose
    communication the cost model prices lower wins (ties: the first). Every rank makes the same choice:
    costs come from layouts and shapes only. ``grad_sbps`` (per parameter, None: the default) asks for
    gradients in another layout than their parameter's (ZeRO-2: split on the data-parallel axis).
    ``arena``: static placement of the program's temporaries (graph/arena.py): True where it does not
    raise the peak, ``"all"`` every one that can be placed. ``values``: layouts the plan fixes for forward
    values by key (``value_keys``); each is boxed there right after the op that makes it. ``gathered``: the
    parameters (by index) stored split on ``zero_axis`` and gathered for each use (default: every one split there).
    """
    programs = [
        _Lowering(joint, mesh, rank, sbps, bucket_bytes, policy, zero_axis, grad_sbps, arena, values, gathered).run()
        for policy in (True, False)
    ]
    return min(programs, key=lambda p: p.cost)
