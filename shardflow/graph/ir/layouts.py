"""The layout pass: the captured joint graph, in graph order, to this rank's instructions.

Each op's signature comes from the shared rule registry (``ops.choose``, priced by boxing and by
``Lookahead``) as eager GlobalTensors would pick it, and a ``Box`` is inserted where a producer's layout
differs from what a consumer needs; a value boxed to some layout once is reused (eager would box it again
for every consumer). The pass also records what each variable holds (``StepIR.refs``, ``storages``) and
hands the gradients over, unsynchronised, to the bucket pass (``ir/buckets.py``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from shardflow.boxing import bound_plan, plan_boxing
from shardflow.boxing.plan import COLLECTIVES, Plan
from shardflow.graph.arena import out_overload
from shardflow.graph.ir.buckets import Gradient
from shardflow.graph.ir.gathers import VIEWS, gather, gather_staging, gathering_ops, unsharded
from shardflow.graph.ir.instr import Box, Comm, Item, Op, OutForm, Unpack
from shardflow.graph.ir.lookahead import Lookahead, Value, demands
from shardflow.graph.ir.step import StepIR, Storage
from shardflow.graph.joint import Joint
from shardflow.graph.values import forced_nodes
from shardflow.ops import LOCALS, PREPARED, WORKSPACE, LocalContext, OpCall, TensorMeta, choose, writes_arg
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, Blocked, NdSbp, P, Placement, S, grad_sbp
from shardflow.placement.shard import local_shape
from shardflow.tensor.trace import OpRecord, Record

_aten = torch.ops.aten
_ALIASING = {_aten._unsafe_view.default, _aten.view.default, _aten.reshape.default, _aten.expand.default}


class _Var:
    """A variable of the generated code standing in for a tensor argument while rendering."""

    def __init__(self, name: str) -> None:
        self.name = name


def boxer(mesh: Mesh, rank: int) -> Any:
    """A local function's conversions (``ctx.box``): each plan bound for ``rank`` at its first use, so later
    steps (and a ``torch.compile`` trace of the program) only run it."""
    bound: dict[Any, Any] = {}

    def run(local: torch.Tensor, src: NdSbp, shape: tuple[int, ...], dst: NdSbp) -> torch.Tensor:
        key = (tuple(shape), local.dtype, src, dst)
        fn = bound.get(key)
        if fn is None:
            fn = bound[key] = bound_plan(plan_boxing(tuple(shape), local.dtype, mesh, src, mesh, dst), rank)
        return fn(local)

    return run


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
        if isinstance(a, _Var):
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
        self.grad_nodes = {n: i for i, n in enumerate(results[n_values : n_values + n_grads])}
        wanted = {node: self.grad_target(self.joint.grad_of[k]) for node, k in self.grad_nodes.items()}
        self.want = demands(graph, wanted, self.mesh, self.blocks)
        values, input_grads = results[:n_values], results[n_values + n_grads :]
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
            self.gathering = gathering_ops(graph, placeholders[: self.joint.n_params], self.sharded)
        self.ir.emit(Unpack(names=tuple(names), source="args"))
        for node in graph.nodes:
            if node.op == "call_function":
                self.call(node)
            elif node.op == "get_attr":
                self.var[node] = self.ir.const(getattr(self.joint.graph, str(node.target)), "attr")
                self.tensor_value(node, node.meta.get("val"), None)
            if node in self.grad_nodes:
                k = self.grad_nodes[node]
                value: Value = self.info[node]
                want = self.grad_target(self.joint.grad_of[k])
                self.gradients.append(Gradient(k, self.var[node], value.sbp, value.meta, want))
            if node is last:
                if self.joint.n_grads_in:  # a stage's forward ends here: its outputs leave it replicated
                    outs = [self.box(v, (B,) * self.mesh.ndim, "stage output")[0] for v in values]
                    self.ir.stage_outputs = tuple(outs)
                    self.ir.emit(Unpack(names=tuple(arriving), source="grads_in"))
                self.phase = "backward"
        self.phase = "after"
        return LayoutResult(results[0], input_grads)

    def finish(
        self, result: LayoutResult, later: Sequence[tuple[int, str, Plan]]
    ) -> tuple[str | None, list[str], dict[int, str]]:
        """Once backward's buckets are launched: the loss replicated (a stage: its inputs' gradients, as its
        inputs came), then the gradients converted after backward. Returns the loss variable (None for a
        stage), the input gradients' variables and the converted gradients by index."""
        if self.joint.n_grads_in:
            loss = None
            input_grads = [self.box(g, (B,) * self.mesh.ndim, "input gradient")[0] for g in result.input_grads]
        else:
            loss, plan = self.box(result.loss, (B,) * self.mesh.ndim, "loss")
            input_grads = []
            if plan is not None:
                self.record.other.append(("loss", plan, None))
        converted: dict[int, str] = {}
        for k, var, plan in later:
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
        return loss, input_grads, converted

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

    # -- one op ---------------------------------------------------------------------------------------------
    def call(self, node: fx.Node) -> None:
        func = node.target
        if func is operator.getitem:
            src, index = node.args
            assert isinstance(src, fx.Node) and isinstance(index, int)
            name = self.var[node] = self.ir.new_var()
            self.ir.emit(Item(out=name, src=self.var[src], index=index))
            part = f"{self.var[src]}#{index}"
            self.ir.alias(name, self.var[src], [part] if part in self.ir.storages else None)
            parts = self.info.get(src)
            if isinstance(parts, list) and parts[index] is not None:
                self.info[node] = parts[index]
            return
        if not isinstance(func, torch._ops.OpOverload):
            raise ValueError(f"cannot lower {node.format_node()}: only ATen ops are supported in a training step")
        flat, spec = tree_flatten((node.args, node.kwargs))
        where = [i for i, a in enumerate(flat) if isinstance(a, fx.Node) and isinstance(self.info.get(a), Value)]
        val = node.meta.get("val")
        wanted: tuple[TensorMeta, Sequence[Placement | None]] | None = None
        if node in self.forced and isinstance(val, torch.Tensor):
            wanted = (TensorMeta(tuple(val.shape), val.dtype), self.forced[node])
        elif node in self.want and isinstance(val, torch.Tensor):
            wanted = (TensorMeta(tuple(val.shape), val.dtype), self.want[node])
        out_flat = [val] if isinstance(val, torch.Tensor) else tree_flatten(val)[0]
        out_metas = [TensorMeta(tuple(o.shape), o.dtype) if isinstance(o, torch.Tensor) else None for o in out_flat]
        name = self.var[node] = self.ir.new_var()
        replicated = (B,) * self.mesh.ndim
        if not where:  # a factory (arange, a mask): computed the same on every rank, so B
            used: list[str] = []
            args = [self.render(a, used) for a in node.args] + [
                f"{k}={self.render(v, used)}" for k, v in node.kwargs.items()
            ]
            self.ir.emit(Op(out=name, fn=self.ir.const(func, "op"), args=", ".join(args), used=tuple(used)))
            self.outputs(node, [replicated] * sum(m is not None for m in out_metas), out_metas)
            self.op_storage(node, name, None, [replicated] * len(out_metas), out_metas)
            return
        values: list[Value] = [self.info[flat[i]] for i in where]
        metas = tuple(v.meta for v in values)
        meta_flat = list(flat)
        for i, m in zip(where, metas):
            meta_flat[i] = m
        margs, mkwargs = tree_unflatten(meta_flat, spec)
        call = OpCall(func, tuple(margs), dict(mkwargs), metas)
        mutated = (0,) if where[0] == 0 and writes_arg(func, 0) else ()
        current = [v.sbp for v in values]
        gathered: dict[int, str] = {}
        if self.zero_axis is not None and func not in VIEWS:
            for t, i in enumerate(where):
                if flat[i] in self.sharded:
                    full = self.unsharded(current[t])
                    gathered[i] = gather(self, node, flat[i], metas[t], current[t], full)
                    current[t] = full
        for t, i in enumerate(where):  # a partial sum transposed from one already reduced: take that instead
            if P in current[t] and t not in mutated and i not in gathered:
                whole = tuple(B if p == P else p for p in current[t])
                reused = self.transposed_box(flat[i], whole)
                if reused is not None:
                    self.info[flat[i]], self.var[flat[i]], current[t] = Value(whole, metas[t]), reused, whole
        pinned = [t for t, i in enumerate(where) if flat[i] in self.params]
        ins, outs = choose(
            call,
            self.mesh,
            current,
            fixed=mutated,
            wanted=wanted,
            after=self.lookahead.pricer(node, out_metas),
            reduce_to_split=self.reduce_to_split,
            pinned=pinned,
        )
        if len(where) == 1 and flat[where[0]] in self.params and func in VIEWS:
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
        workspace = 0
        if fn is not None:
            shapes = tuple(m.shape if m is not None else None for m in out_metas)
            ctx = LocalContext(call, self.mesh, self.coord, ins, outs, shapes, boxer(self.mesh, self.rank))
            kw = f"{{{', '.join(f'{k!r}: {self.render(v, used)}' for k, v in lkwargs.items())}}}"
            if func in PREPARED:  # what depends only on the context is worked out now, once
                callee, text = self.ir.const(PREPARED[func](ctx), "local"), f"{self.render(tuple(largs), used)}, {kw}"
            else:
                callee = self.ir.const(fn, "local")
                text = f"{self.ir.const(ctx, 'ctx')}, {self.render(tuple(largs), used)}, {kw}"
            if func in WORKSPACE:  # the local function's own temporaries, alive while it runs
                workspace = WORKSPACE[func](ctx)
        else:
            text = ", ".join(
                [self.render(a, used) for a in largs] + [f"{k}={self.render(v, used)}" for k, v in lkwargs.items()]
            )
            callee = self.ir.const(func, "op")
        wants = [
            local_shape(m.shape, s, self.mesh.shape, self.coord) for m, s in zip([m for m in out_metas if m], outs)
        ]
        if isinstance(val, torch.Tensor):
            checks: tuple[tuple[int | None, tuple[int, ...]], ...] = ((None, tuple(wants[0])),)
        else:
            tensor_at = [i for i, m in enumerate(out_metas) if m is not None]
            checks = tuple((i, tuple(w)) for i, w in zip(tensor_at, wants))
        # a local function's result is new unless its op's schema says it aliases (checked at the first run)
        local_new = fn is not None and func not in _ALIASING and not any(r.alias_info for r in func._schema.returns)
        at = self.ir.emit(
            Op(
                out=name,
                fn=callee,
                args=text,
                used=tuple(used),
                op=op_name,
                checks=checks,
                local_new=local_new,
                temp=workspace,
            )
        )
        self.outputs(node, list(outs), out_metas)
        first = local_flat[where[0]]
        self.op_storage(node, name, first.name if isinstance(first, _Var) else None, list(outs), out_metas)
        if node in self.forced and outs[0] != self.forced[node]:  # the plan fixes this value's layout
            forced, meta = self.forced[node], self.info[node].meta
            var, plan = self.box_from(name, meta, outs[0], forced, f"{op_name} (forced by the plan)")
            record.boxing.append(plan)
            self.var[node], self.info[node] = var, Value(forced, meta)
        if fn is None and self.arena:
            form = self.out_form(func, name, out_metas, wants)
            op = self.ir.body[at]
            if form is not None and isinstance(op, Op):
                self.ir.body[at] = dataclasses.replace(op, out_form=form)

    def outputs(self, node: fx.Node, outs: list[NdSbp], out_metas: list[TensorMeta | None]) -> None:
        if len(outs) != sum(m is not None for m in out_metas):
            raise AssertionError(f"layout rule of {node.target} gave {len(outs)} output layouts")
        it = iter(outs)
        values = [Value(next(it), m) if m is not None else None for m in out_metas]
        self.info[node] = values[0] if isinstance(node.meta.get("val"), torch.Tensor) else values

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
            self.ir.alias(name, first)
            return
        tensor_outs = iter(outs)
        label = str(func).replace("aten.", "")
        if isinstance(node.meta.get("val"), torch.Tensor):
            self.store(name, self.local_bytes(out_metas[0], next(tensor_outs)), label)  # type: ignore[arg-type]
            return
        self.ir.refs[name] = []
        for i, m in enumerate(out_metas):
            if m is not None:
                key = f"{name}#{i}"
                nbytes = self.local_bytes(m, next(tensor_outs))
                self.ir.storages[key] = Storage(nbytes, f"{label} output {i} ({self.phase})")
                self.ir.refs[name].append(key)

    def out_form(
        self, func: Any, name: str, out_metas: list[TensorMeta | None], shapes: list[tuple[int, ...]]
    ) -> OutForm | None:
        """How the op may write its new storages into arena blocks: when it has an out= overload."""
        found = out_overload(func)
        if found is None or func in _ALIASING or any(m is None for m in out_metas):
            return None
        keys = self.ir.refs.get(name, [])
        if keys != [name] and keys != [f"{name}#{i}" for i in range(len(out_metas))]:
            return None
        overload, out_names = found
        if len(out_names) != len(keys):
            return None
        shaped = tuple((tuple(shape), meta.dtype) for shape, meta in zip(shapes, out_metas))  # type: ignore[union-attr]
        return OutForm(self.ir.const(overload, "out"), tuple(out_names), tuple(keys), shaped)


@dataclass(frozen=True)
class LayoutResult:
    """What the traversal leaves for the epilogue: the loss node, and a stage's input-gradient nodes."""

    loss: fx.Node
    input_grads: list[fx.Node]
