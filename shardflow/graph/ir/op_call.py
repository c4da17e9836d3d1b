"""Lowering one op of the joint graph: its signature chosen, its inputs boxed (or gathered, ZeRO-3), the
call emitted as an ``Op`` (an ATen op, or a local function from ``ops/`` where the layout needs one), and
what its results hold recorded for liveness and arena placement.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from shardflow.boxing import bound_plan, plan_boxing
from shardflow.graph.arena import out_overload
from shardflow.graph.ir.gathers import VIEWS, gather
from shardflow.graph.ir.instr import Item, Op, OutForm, Work
from shardflow.graph.ir.step import Storage, Value
from shardflow.graph.kernel_time import KernelCall
from shardflow.ops import (
    INSIDE,
    LOCALS,
    PREPARED,
    WORKSPACE,
    Inside,
    LocalContext,
    OpCall,
    TensorMeta,
    choose,
    writes_any,
    writes_arg,
)
from shardflow.ops.flop_count import op_name as flops_key
from shardflow.ops.flop_count import recomputed
from shardflow.ops.flops import op_flops
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, NdSbp, P, Placement
from shardflow.placement.shard import local_shape
from shardflow.tensor.trace import OpRecord

if TYPE_CHECKING:
    from shardflow.graph.ir.layouts import LayoutPass

_aten = torch.ops.aten
_ALIASING = {_aten._unsafe_view.default, _aten.view.default, _aten.reshape.default, _aten.expand.default}


class Var:
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


def _item(lp: LayoutPass, node: fx.Node) -> None:
    """One result of a multi-result op: it holds that result's storage, and has its layout."""
    src, index = node.args
    assert isinstance(src, fx.Node) and isinstance(index, int)
    name = lp.var[node] = lp.ir.new_var()
    lp.ir.emit(Item(out=name, src=lp.var[src], index=index))
    part = f"{lp.var[src]}#{index}"
    lp.ir.alias(name, lp.var[src], [part] if part in lp.ir.storages else None)
    parts = lp.info.get(src)
    if isinstance(parts, list) and parts[index] is not None:
        lp.info[node] = parts[index]


def lower_call(lp: LayoutPass, node: fx.Node) -> None:
    """Emit ``node`` (see the module docstring)."""
    func = node.target
    if func is operator.getitem:
        _item(lp, node)
        return
    if not isinstance(func, torch._ops.OpOverload):
        raise ValueError(f"cannot lower {node.format_node()}: only ATen ops are supported in a training step")
    flat, spec = tree_flatten((node.args, node.kwargs))
    where = [i for i, a in enumerate(flat) if isinstance(a, fx.Node) and isinstance(lp.info.get(a), Value)]
    val = node.meta.get("val")
    wanted: tuple[TensorMeta, Sequence[Placement | None]] | None = None
    if node in lp.forced and isinstance(val, torch.Tensor):
        wanted = (TensorMeta(tuple(val.shape), val.dtype), lp.forced[node])
    elif node in lp.want and isinstance(val, torch.Tensor):
        wanted = (TensorMeta(tuple(val.shape), val.dtype), lp.want[node])
    out_flat = [val] if isinstance(val, torch.Tensor) else tree_flatten(val)[0]
    out_metas = [TensorMeta(tuple(o.shape), o.dtype) if isinstance(o, torch.Tensor) else None for o in out_flat]
    name = lp.var[node] = lp.ir.new_var()
    replicated = (B,) * lp.mesh.ndim
    if not where:  # a factory (arange, a mask): computed the same on every rank, so B
        read: list[str] = []
        args = [lp.render(a, read) for a in node.args] + [f"{k}={lp.render(v, read)}" for k, v in node.kwargs.items()]
        work = Work(flops_key(func), _phase(lp, node), op_flops(func, node.args, node.kwargs, out_metas))
        lp.ir.emit(Op(out=name, fn=lp.ir.const(func, "op"), args=", ".join(args), used=tuple(read), work=work))
        outputs(lp, node, [replicated] * sum(m is not None for m in out_metas), out_metas)
        op_storage(lp, node, name, None, [replicated] * len(out_metas), out_metas)
        return
    values: list[Value] = [lp.info[flat[i]] for i in where]
    metas = tuple(v.meta for v in values)
    meta_flat = list(flat)
    for i, m in zip(where, metas):
        meta_flat[i] = m
    margs, mkwargs = tree_unflatten(meta_flat, spec)
    call = OpCall(func, tuple(margs), dict(mkwargs), metas)
    mutated = (0,) if where[0] == 0 and writes_arg(func, 0) else ()
    current = [v.sbp for v in values]
    gathered = _gathered_or_reused(lp, node, [flat[i] for i in where], metas, current, mutated)
    pinned = [t for t, i in enumerate(where) if flat[i] in lp.params]
    ins, outs = choose(
        call,
        lp.mesh,
        current,
        fixed=mutated,
        wanted=wanted,
        after=lp.lookahead.pricer(node, out_metas),
        reduce_to_split=lp.reduce_to_split,
        pinned=pinned,
    )
    if len(where) == 1 and flat[where[0]] in lp.params and func in VIEWS:
        lp.params.add(node)  # a view of a parameter is pinned like the parameter
        if flat[where[0]] in lp.sharded:
            lp.sharded.add(node)
    op_name = str(func)
    record = OpRecord(op_name, tuple(current), ins, outs)
    lp.record.ops.append(record)
    local_flat = list(flat)
    for t, (i, need) in enumerate(zip(where, ins)):
        if lp.info[flat[i]].sbp != need and i < len(node.args) and writes_arg(func, i):
            raise ValueError(f"{op_name} updates an input in place that would first need boxing to {need}")
        if t in gathered:
            var, plan = gathered[t], None
            if current[t] != need:  # pinned: a local conversion of the gathered copy
                var, plan = lp.box_from(var, metas[t], current[t], need, op_name)
        else:
            var, plan = lp.box(flat[i], need, op_name)
        if plan is not None:
            record.boxing.append(plan)
        local_flat[i] = Var(var)
    if mutated:  # later readers of the mutated value must not reuse copies boxed before the update
        lp.boxed = {k: v for k, v in lp.boxed.items() if k[0] is not flat[where[0]]}
    largs, lkwargs = tree_unflatten(local_flat, spec)
    used: list[str] = []
    fn = LOCALS.get(func)
    callee, text, workspace, inner = _callee(lp, call, ins, outs, out_metas, largs, lkwargs, used)
    wants = [local_shape(m.shape, s, lp.mesh.shape, lp.coord) for m, s in zip([m for m in out_metas if m], outs)]
    if isinstance(val, torch.Tensor):
        checks: tuple[tuple[int | None, tuple[int, ...]], ...] = ((None, tuple(wants[0])),)
    else:
        tensor_at = [i for i, m in enumerate(out_metas) if m is not None]
        checks = tuple((i, tuple(w)) for i, w in zip(tensor_at, wants))
    # a local function's result is new unless its op's schema says it aliases (checked at the first run)
    local_new = fn is not None and func not in _ALIASING and not any(r.alias_info for r in func._schema.returns)
    at = lp.ir.emit(
        Op(
            out=name,
            fn=callee,
            args=text,
            used=tuple(used),
            op=op_name,
            checks=checks,
            local_new=local_new,
            temp=workspace,
            work=_inner_work(
                lp, _local_work(lp, node, meta_flat, spec, where, ins, out_metas, wants), inner, metas[0], ins[0]
            ),
        )
    )
    outputs(lp, node, list(outs), out_metas)
    first = local_flat[where[0]]
    op_storage(lp, node, name, first.name if isinstance(first, Var) else None, list(outs), out_metas)
    if node in lp.forced and outs[0] != lp.forced[node]:  # the plan fixes this value's layout
        forced, meta = lp.forced[node], lp.info[node].meta
        var, plan = lp.box_from(name, meta, outs[0], forced, f"{op_name} (forced by the plan)")
        record.boxing.append(plan)
        lp.var[node], lp.info[node] = var, Value(forced, meta)
    if fn is None and lp.arena:
        form = out_form(lp, func, name, out_metas, wants)
        op = lp.ir.body[at]
        if form is not None and isinstance(op, Op):
            lp.ir.body[at] = dataclasses.replace(op, out_form=form)


def _phase(lp: LayoutPass, node: fx.Node) -> str:
    return "recompute" if recomputed(node) else "backward" if lp.phase != "forward" else "forward"


def _local_work(
    lp: LayoutPass,
    node: fx.Node,
    meta_flat: list[Any],
    spec: Any,
    where: list[int],
    ins: Sequence[NdSbp],
    out_metas: list[TensorMeta | None],
    wants: list[Any],
) -> Work:
    """The op's FLOPs on this rank: its formula on the local shapes of the layouts chosen for it (a partial
    sum's local is whole-sized: each rank computes its share of every element)."""
    flat = list(meta_flat)
    for i, need in zip(where, ins):
        m = flat[i]
        flat[i] = TensorMeta(tuple(local_shape(m.shape, need, lp.mesh.shape, lp.coord)), m.dtype)
    args, kwargs = tree_unflatten(flat, spec)
    shapes = iter(wants)
    outs = [TensorMeta(tuple(next(shapes)), m.dtype) if m is not None else None for m in out_metas]
    func = node.target
    tensors = [m for m in (*flat, *outs) if isinstance(m, TensorMeta)]
    view = _is_view(func)
    nbytes = 0 if view else sum(math.prod(m.shape) * m.dtype.itemsize for m in tensors)
    dtype = str(tensors[0].dtype).removeprefix("torch.") if tensors else "float32"
    work = Work(flops_key(func), _phase(lp, node), op_flops(func, args, kwargs, outs), nbytes, dtype)
    # not timed: an op writing an input (timing would change what it reads), a view (a launch, whatever its size)
    if view or writes_any(func):
        return work
    results = tuple(tuple(m.shape) for m in outs if m is not None)
    return dataclasses.replace(work, call=KernelCall(func, tuple(args), dict(kwargs), results))


def _inner_work(lp: LayoutPass, work: Work, inner: Inside, first: TensorMeta, sbp: NdSbp) -> Work:
    """``work`` with what a local function runs inside the op: its kernels, its passes over its first
    input, and its conversions' boxing plans (in the first input's dtype)."""
    if inner == Inside():
        return work
    nbytes = inner.passes * lp.local_bytes(first, sbp) if inner.passes else work.nbytes
    boxes = tuple(plan_boxing(b.shape, first.dtype, lp.mesh, b.src, lp.mesh, b.dst) for b in inner.boxes)
    return dataclasses.replace(work, kernels=inner.kernels, nbytes=nbytes, boxes=boxes)


def _is_view(func: Any) -> bool:
    """Whether ``func`` returns a view of an input (it moves no bytes); an in-place op writes its input."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return False
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def _gathered_or_reused(
    lp: LayoutPass,
    node: fx.Node,
    inputs: list[fx.Node],
    metas: tuple[TensorMeta, ...],
    current: list[NdSbp],
    mutated: tuple[int, ...],
) -> dict[int, str]:
    """Before the signature is chosen: ZeRO-3 inputs gathered (by input position, their variable), and a
    partial sum transposed from one already reduced taken reduced instead. Updates ``current`` in place."""
    gathered: dict[int, str] = {}
    if lp.zero_axis is not None and node.target not in VIEWS:
        for t, src in enumerate(inputs):
            if src in lp.sharded:
                full = lp.unsharded(current[t])
                gathered[t] = gather(lp, node, src, metas[t], current[t], full)
                current[t] = full
    for t, src in enumerate(inputs):
        if P in current[t] and t not in mutated and t not in gathered:
            whole = tuple(B if p == P else p for p in current[t])
            reused = lp.transposed_box(src, whole)
            if reused is not None:
                lp.info[src], lp.var[src], current[t] = Value(whole, metas[t]), reused, whole
    return gathered


def _callee(
    lp: LayoutPass,
    call: OpCall,
    ins: Sequence[NdSbp],
    outs: Sequence[NdSbp],
    out_metas: list[TensorMeta | None],
    largs: Any,
    lkwargs: dict[str, Any],
    used: list[str],
) -> tuple[str, str, int, Inside]:
    """What the ``Op`` calls and its argument text (the variables read go to ``used``), the bytes of its
    own temporaries and what it runs inside: the ATen op on locals, or the op's local function (``ops/``)
    with its context."""
    fn = LOCALS.get(call.func)
    if fn is None:
        text = ", ".join(
            [lp.render(a, used) for a in largs] + [f"{k}={lp.render(v, used)}" for k, v in lkwargs.items()]
        )
        return lp.ir.const(call.func, "op"), text, 0, Inside()
    shapes = tuple(m.shape if m is not None else None for m in out_metas)
    ctx = LocalContext(call, lp.mesh, lp.coord, tuple(ins), tuple(outs), shapes, boxer(lp.mesh, lp.rank))
    kw = f"{{{', '.join(f'{k!r}: {lp.render(v, used)}' for k, v in lkwargs.items())}}}"
    if call.func in PREPARED:  # what depends only on the context is worked out now, once
        callee, text = lp.ir.const(PREPARED[call.func](ctx), "local"), f"{lp.render(tuple(largs), used)}, {kw}"
    else:
        callee = lp.ir.const(fn, "local")
        text = f"{lp.ir.const(ctx, 'ctx')}, {lp.render(tuple(largs), used)}, {kw}"
    workspace = WORKSPACE[call.func](ctx) if call.func in WORKSPACE else 0  # alive while it runs
    return callee, text, workspace, INSIDE[call.func](ctx) if call.func in INSIDE else Inside()


def outputs(lp: LayoutPass, node: fx.Node, outs: list[NdSbp], out_metas: list[TensorMeta | None]) -> None:
    if len(outs) != sum(m is not None for m in out_metas):
        raise AssertionError(f"layout rule of {node.target} gave {len(outs)} output layouts")
    it = iter(outs)
    values = [Value(next(it), m) if m is not None else None for m in out_metas]
    lp.info[node] = values[0] if isinstance(node.meta.get("val"), torch.Tensor) else values


def op_storage(
    lp: LayoutPass, node: fx.Node, name: str, first: str | None, outs: list[NdSbp], out_metas: list[TensorMeta | None]
) -> None:
    """Record what the op's output holds: its first input's storage for views and in-place ops (their
    schema says the result aliases an argument; ``_unsafe_view`` and the shape-op locals too), else a
    new storage per tensor output, sized by its local shape."""
    func = node.target
    returns = func._schema.returns  # type: ignore[union-attr]
    aliases = func in _ALIASING or any(r.alias_info is not None for r in returns)
    if aliases and first is not None:
        lp.ir.alias(name, first)
        return
    tensor_outs = iter(outs)
    label = str(func).replace("aten.", "")
    if isinstance(node.meta.get("val"), torch.Tensor):
        lp.store(name, lp.local_bytes(out_metas[0], next(tensor_outs)), label)  # type: ignore[arg-type]
        return
    lp.ir.refs[name] = []
    for i, m in enumerate(out_metas):
        if m is not None:
            key = f"{name}#{i}"
            nbytes = lp.local_bytes(m, next(tensor_outs))
            lp.ir.storages[key] = Storage(nbytes, f"{label} output {i} ({lp.phase})")
            lp.ir.refs[name].append(key)


def out_form(
    lp: LayoutPass, func: Any, name: str, out_metas: list[TensorMeta | None], shapes: list[tuple[int, ...]]
) -> OutForm | None:
    """How the op may write its new storages into arena blocks: when it has an out= overload."""
    found = out_overload(func)
    if found is None or func in _ALIASING or any(m is None for m in out_metas):
        return None
    keys = lp.ir.refs.get(name, [])
    if keys != [name] and keys != [f"{name}#{i}" for i in range(len(out_metas))]:
        return None
    overload, out_names = found
    if len(out_names) != len(keys):
        return None
    shaped = tuple((tuple(shape), meta.dtype) for shape, meta in zip(shapes, out_metas))  # type: ignore[union-attr]
    return OutForm(lp.ir.const(overload, "out"), tuple(out_names), tuple(keys), shaped)
