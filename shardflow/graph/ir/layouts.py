"""The layout pass: the captured joint graph, in graph order, to this rank's instructions.

Each op's signature comes from the shared rule registry (``ops.choose``, priced by boxing and by
``Lookahead``) as eager GlobalTensors would pick it, and a ``Box`` is inserted where a producer's layout
differs from what a consumer needs; a value boxed to some layout once is reused (eager would box it again
for every consumer). The pass also records what each variable holds (``StepIR.refs``, ``storages``) and
hands the gradients over, unsynchronised, to the bucket pass (``ir/buckets.py``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from shardflow.boxing import bound_plan, plan_boxing
from shardflow.boxing.plan import COLLECTIVES, Plan
from shardflow.graph.ir.gathers import gather_staging, gathering_ops, unsharded
from shardflow.graph.ir.instr import Box, Comm, Op, Unpack
from shardflow.graph.ir.lookahead import Lookahead, demands
from shardflow.graph.ir.op_call import Var, lower_call
from shardflow.graph.ir.step import Conversion, Gradient, StepIR, Value
from shardflow.graph.joint import Joint
from shardflow.graph.values import forced_nodes
from shardflow.ops import TensorMeta
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, Blocked, NdSbp, Placement, S, grad_sbp
from shardflow.placement.shard import local_shape
from shardflow.tensor.trace import Record

_aten = torch.ops.aten


class LayoutPass:
    """One pass over the joint graph for one rank; see the module docstring. ``reduce_to_split``: the
    whole-program policy (partial sums may be reduce-scattered into splits, or only reduced to ``B``)."""

    def __init__(
        self,
        joint: Joint,
        mesh: Mesh,
        rank: int,
        sbps: Sequence[NdSbp | None],
        reduce_to_split: bool,
        zero_axis: int | None,
        grad_sbps: Sequence[NdSbp | None],
        values: Mapping[str, NdSbp] | None,
        gathered: Collection[int] | None,
        arena: bool,
    ) -> None:
        self.joint, self.mesh, self.rank, self.arena = joint, mesh, rank, arena
        self.sbps = list(sbps)  # one per placeholder: params, buffers, inputs (None: not a tensor)
        self.grad_sbps = list(grad_sbps)  # per parameter: its gradient's layout when not its own (ZeRO-2)
        self.reduce_to_split, self.zero_axis, self.gathered = reduce_to_split, zero_axis, gathered
        self.forced = forced_nodes(joint.graph.graph, values or {}, mesh)  # the plan's layouts of values
        self.coord = mesh.coord_of(rank)
        self.ir = StepIR()
        self.record = Record()
        self.phase = "forward"
        self.info: dict[fx.Node, Any] = {}
        self.var: dict[fx.Node, str] = {}
        self.boxed: dict[tuple[fx.Node, NdSbp], str] = {}
        self.params: set[fx.Node] = set()  # parameters and views of them: pinned where the strategy put them
        self.sharded: set[fx.Node] = set()  # ZeRO-3 parameters and their views
        # block counts of Blocked layouts (fused projections): lookahead prices their lifted signatures too
        blocks = sorted({p.blocks for sbp in sbps if sbp for p in sbp if isinstance(p, Blocked)})
        self.lookahead = Lookahead(mesh, blocks, reduce_to_split, self.info, self.params)
        self.blocks = blocks
        self.gradients: list[Gradient] = []
        self.gathering: dict[fx.Node, int] = {}  # ZeRO-3: the ops gathering parameters, numbered

    # -- helpers ------------------------------------------------------------------------------------------
    def render(self, a: Any, used: list[str]) -> str:
        if isinstance(a, Var):
            used.append(a.name)
            return a.name
        if isinstance(a, fx.Node):
            name = self.var[a]
            if name in self.ir.variables:
                used.append(name)
            return name
        if isinstance(a, (list, tuple)):
            inner = ", ".join(self.render(x, used) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if a is None or isinstance(a, (bool, int, str)) or (isinstance(a, float) and math.isfinite(a)):
            return repr(a)
        return self.ir.const(a, "c")

    def store(self, var: str, nbytes: int, label: str) -> None:
        self.ir.store(var, nbytes, f"{label} ({self.phase})")

    def local_bytes(self, meta: TensorMeta, sbp: NdSbp) -> int:
        return math.prod(local_shape(meta.shape, sbp, self.mesh.shape, self.coord)) * meta.dtype.itemsize

    def unsharded(self, sbp: NdSbp) -> NdSbp:
        assert self.zero_axis is not None
        return unsharded(sbp, self.zero_axis)

    # -- boxing -------------------------------------------------------------------------------------------
    def box(self, node: fx.Node, need: NdSbp, where: str) -> tuple[str, Plan | None]:
        """The variable holding ``node`` in layout ``need`` (boxed once, then reused)."""
        value: Value = self.info[node]
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
        if not isinstance(src, fx.Node) or not isinstance(self.info.get(src), Value):
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
        name = self.ir.new_var()
        rest = "" if node.target is _aten.t.default else f", {a}, {b}"
        self.ir.emit(Op(out=name, fn=self.ir.const(node.target, "op"), args=f"{boxed}{rest}", used=(boxed,)))
        self.ir.alias(name, boxed)  # a view: the boxed source's storage
        return name

    def box_from(self, src: str, meta: TensorMeta, sbp: NdSbp, need: NdSbp, where: str) -> tuple[str, Plan]:
        """Emit the boxing of variable ``src`` (layout ``sbp``) to ``need`` into a new variable."""
        plan = plan_boxing(meta.shape, meta.dtype, self.mesh, sbp, self.mesh, need)
        name = self.ir.new_var()
        fn = self.ir.const(bound_plan(plan, self.rank), "box")
        staging = 0
        if any(step.kind in COLLECTIVES for step in plan.steps):  # padded or packed copies of the input
            staging = self.local_bytes(meta, sbp) + gather_staging(self.mesh, self.coord, plan, meta, need)
        comm = None
        if any(step.kind in COLLECTIVES or step.kind == "send_recv" for step in plan.steps):  # not local-only
            comm = Comm(self.phase, where, plan.route, plan)
        self.ir.emit(Box(out=name, src=src, fn=fn, route=plan.route, temp=staging, comm=comm))
        self.store(name, self.local_bytes(meta, need), f"{where}: input boxed {plan.route}")
        if src in self.ir.param_alias:
            self.ir.param_alias[name] = self.ir.param_alias[src]
        return name, plan

    # -- the pass -----------------------------------------------------------------------------------------
    def run(self) -> LayoutResult:
        graph = self.joint.graph.graph
        output = next(n for n in graph.nodes if n.op == "output")
        results: list[fx.Node] = list(output.args[0])  # type: ignore[arg-type]
        n_values, n_grads = self.joint.n_values, len(self.joint.grad_of)
        # one node may be several parameters' gradient (autograd hands ``a + b``'s terms the same tensor)
        self.grad_nodes: dict[fx.Node, list[int]] = {}
        for k, n in enumerate(results[n_values : n_values + n_grads]):
            self.grad_nodes.setdefault(n, []).append(k)
        wanted = {node: self.grad_target(self.joint.grad_of[ks[0]]) for node, ks in self.grad_nodes.items()}
        self.want = demands(graph, wanted, self.mesh, self.blocks)
        values, input_grads = results[:n_values], results[n_values + n_grads :]
        # make_fx records the forward up to the loss, then autograd's backward (a stage's trace detaches its
        # outputs as its forward ends)
        last: fx.Node | None = values[-1] if values and not self.joint.forward_only else None
        if last is not None and self.joint.n_grads_in == 0 and last.target == torch.ops.aten.detach.default:
            last = last.args[0]  # type: ignore[assignment]
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.sbps):
            raise AssertionError(f"traced step has {len(placeholders)} inputs, expected {len(self.sbps)}")
        names = self.var_of_placeholders(placeholders)
        arriving = names[len(names) - self.joint.n_grads_in :] if self.joint.n_grads_in else []
        names = names[: len(names) - len(arriving)]
        if self.zero_axis is not None:
            self.gathering = gathering_ops(graph, placeholders[: self.joint.n_params], self.sharded)
        self.ir.emit(Unpack(names=tuple(names), source="args"))
        for node in graph.nodes:
            if node.op == "call_function":
                lower_call(self, node)
            elif node.op == "get_attr":
                self.var[node] = self.ir.const(getattr(self.joint.graph, str(node.target)), "attr")
                self.tensor_value(node, node.meta.get("val"), None)
            for k in self.grad_nodes.get(node, []):
                value: Value = self.info[node]
                want = self.grad_target(self.joint.grad_of[k])
                self.gradients.append(Gradient(k, self.var[node], value.sbp, value.meta, want))
            if node is last:
                if self.joint.n_grads_in:  # a stage's forward ends here: its outputs leave it replicated
                    outs = [self.box(v, (B,) * self.mesh.ndim, "stage output")[0] for v in values]
                    self.ir.stage_outputs = tuple(outs)
                    self.ir.emit(Unpack(names=tuple(arriving), source="grads_in"))
                self.phase = "backward"
        if not self.joint.forward_only:
            self.phase = "after"
        return LayoutResult(results[0] if results else None, input_grads)

    def finish(self, result: LayoutResult, later: Sequence[Conversion]) -> Epilogue:
        """Once backward's buckets are launched: the loss replicated (a stage: its inputs' gradients, as its
        inputs came), then the gradients converted after backward."""
        if self.joint.n_grads_in:
            loss = None
            input_grads = [self.box(g, (B,) * self.mesh.ndim, "input gradient")[0] for g in result.input_grads]
        else:
            assert result.loss is not None, "a training step returns its loss"
            loss, plan = self.box(result.loss, (B,) * self.mesh.ndim, "loss")
            first = self.joint.n_params + self.joint.n_buffers  # the inputs' placeholders follow these
            input_grads = [
                self.box(g, grad_sbp(self.sbps[first + i] or (B,) * self.mesh.ndim), "input gradient")[0]
                for g, i in zip(result.input_grads, self.joint.input_grad_of)
            ]
            if plan is not None:
                self.record.other.append(("loss", plan, None))
        converted: dict[int, str] = {}
        for k, var, plan in ((c.k, c.var, c.plan) for c in later):
            name = self.ir.new_var()
            comm = None
            if any(step.kind in COLLECTIVES or step.kind == "send_recv" for step in plan.steps):
                comm = Comm(self.phase, "gradient", plan.route, plan)
            fn = self.ir.const(bound_plan(plan, self.rank), "box")
            self.ir.emit(Box(out=name, src=var, fn=fn, route=plan.route, comm=comm))
            meta = TensorMeta(plan.shape, plan.dtype)
            self.store(name, self.local_bytes(meta, plan.dst_sbp), f"gradient to its layout by {plan.route}")
            self.record.other.append(("gradient", plan, None))
            converted[k] = name
        return Epilogue(loss, tuple(input_grads), converted)

    def var_of_placeholders(self, placeholders: list[fx.Node]) -> list[str]:
        self.params.update(placeholders[: self.joint.n_params])
        if self.zero_axis is not None:
            for i, (node, sbp) in enumerate(zip(placeholders[: self.joint.n_params], self.sbps)):
                split = sbp is not None and isinstance(sbp[self.zero_axis], S)
                if (i in self.gathered) if self.gathered is not None else split:
                    self.sharded.add(node)
        names = []
        for i, (node, sbp) in enumerate(zip(placeholders, self.sbps)):
            name = self.var[node] = self.ir.new_var()
            if i < self.joint.n_params:
                self.ir.param_alias[name] = frozenset({i})
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                self.info[node] = Value(sbp or (B,) * self.mesh.ndim, TensorMeta(tuple(val.shape), val.dtype))
            names.append(name)
        return names

    def tensor_value(self, node: fx.Node, val: Any, sbp: NdSbp | None) -> None:
        if isinstance(val, torch.Tensor):
            self.info[node] = Value(sbp or (B,) * self.mesh.ndim, TensorMeta(tuple(val.shape), val.dtype))

    def grad_target(self, param: int) -> NdSbp:
        """The layout parameter ``param``'s gradient is returned in: its own with P as B, unless overridden."""
        if param < len(self.grad_sbps) and self.grad_sbps[param] is not None:
            return self.grad_sbps[param]  # type: ignore[return-value]
        return grad_sbp(self.sbps[param])  # type: ignore[arg-type]


@dataclass(frozen=True)
class Epilogue:
    """The loss variable (None for a stage), a stage's input gradients, and gradients converted by index."""

    loss: str | None
    input_grads: tuple[str, ...]
    converted: dict[int, str]


@dataclass(frozen=True)
class LayoutResult:
    """What the traversal leaves for the epilogue: the loss node, and a stage's input-gradient nodes."""

    loss: fx.Node | None  # None: an evaluation that returns no tensor
    input_grads: list[fx.Node]
