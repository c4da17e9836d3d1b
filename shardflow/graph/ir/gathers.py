"""ZeRO-3 gathers: a parameter stored split on the data-parallel axis is gathered right before each op
computing with it (views of it stay split) and freed after; backward gathers it again.

Prefetch: the gathers of the next gathering op are started while the op before computes (one op ahead),
where the plan is a single all-gather that can start and its input exists already. A view made later
(``make_fx`` puts ``t(weight)`` right before its matmul) is handled by gathering its parameter early and
replaying the views on the gathered copy at the use: they commute with the gather.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from shardflow.boxing import can_start, finish_plan, plan_boxing, start_plan
from shardflow.graph.ir.instr import Box, Comm, GatherStart, Op
from shardflow.graph.ir.lookahead import Value, is_tensor
from shardflow.ops import TensorMeta
from shardflow.placement.sbp import B, NdSbp

if TYPE_CHECKING:
    from shardflow.graph.ir.layouts import LayoutPass

_aten = torch.ops.aten
VIEWS = {_aten.t.default, _aten.transpose.int, _aten.view.default, _aten._unsafe_view.default, _aten.detach.default}
_REPLAYED = {_aten.t.default, _aten.transpose.int, _aten.detach.default}  # views without shape arguments


def gathering_ops(graph: fx.Graph, params: list[fx.Node], sharded: set[fx.Node]) -> list[tuple[fx.Node, list[fx.Node]]]:
    """The ops that will gather sharded parameters (or views of them), in graph order, with what they gather."""
    sharded = {n for n in params if n in sharded}
    known = set(params)
    out: list[tuple[fx.Node, list[fx.Node]]] = []
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        flat, _ = tree_flatten((node.args, node.kwargs))
        tensors = [a for a in flat if isinstance(a, fx.Node) and is_tensor(a)]
        if node.target in VIEWS:
            if len(tensors) == 1 and tensors[0] in known:
                known.add(node)
                if tensors[0] in sharded:
                    sharded.add(node)
            continue
        ins = list(dict.fromkeys(a for a in tensors if a in sharded))
        if ins:
            out.append((node, ins))
    return out


class Gathers:
    """The gathering ops of one program and the gathers started ahead of them."""

    def __init__(self, lp: LayoutPass, graph: fx.Graph, params: list[fx.Node]) -> None:
        self.lp = lp
        self.ops = gathering_ops(graph, params, lp.sharded)
        self.index = {node: i for i, (node, _) in enumerate(self.ops)}
        self.started: dict[tuple[fx.Node, fx.Node], tuple[str, list[fx.Node]]] = {}  # -> (handle, views)

    def gather(self, node: fx.Node, src: fx.Node, meta: TensorMeta, sbp: NdSbp, full: NdSbp) -> str:
        """The variable holding ``src`` gathered for ``node``: the prefetched gathering picked up, or one now."""
        lp, ir = self.lp, self.lp.ir
        found = self.started.pop((node, src), None)
        if found is None:
            return lp.box_from(lp.var[src], meta, sbp, full, "ZeRO-3 gather")[0]
        handle, views = found
        name = ir.new_var()
        ir.emit(Box(out=name, src=handle, fn=ir.const(finish_plan, "finish")))
        for view in reversed(views):  # the views between the parameter and what the op reads
            prev, name = name, ir.new_var()
            args = ", ".join([prev, *(repr(a) for a in view.args[1:])])
            ir.emit(Op(out=name, fn=ir.const(view.target, "op"), args=args, used=(prev,)))
        ir.alias(name, handle)  # the gathered buffer (or its copy: counted once, as a view)
        return name

    def prefetch_after(self, node: fx.Node) -> None:
        """Start the next gathering op's gathers now, if ``node`` is a gathering op."""
        if node in self.index:
            self.prefetch(self.index[node] + 1)

    def prefetch(self, index: int) -> None:
        if index >= len(self.ops):
            return
        lp, ir = self.lp, self.lp.ir
        node, ins = self.ops[index]
        for src in ins:
            base, views = src, []
            while base not in lp.var and base.target in _REPLAYED and isinstance(base.args[0], fx.Node):
                views.append(base)
                base = base.args[0]
            value = lp.info.get(base)
            if base not in lp.var or not isinstance(value, Value) or (node, src) in self.started:
                continue
            full = lp.unsharded(value.sbp)
            plan = plan_boxing(value.meta.shape, value.meta.dtype, lp.mesh, value.sbp, lp.mesh, full)
            if not can_start(plan, lp.rank):
                continue
            handle = ir.new_var()
            fn = ir.const(functools.partial(start_plan, plan), "start")
            comm = Comm(lp.phase, "ZeRO-3 gather (prefetched)", plan.route, plan)
            staging = lp.gather_staging(plan, value.meta, full)
            ir.emit(GatherStart(out=handle, src=lp.var[base], fn=fn, temp=staging, comm=comm))
            lp.store(handle, lp.local_bytes(value.meta, full), "ZeRO-3 gather, prefetched")
            if lp.var[base] in ir.param_alias:
                ir.param_alias[handle] = ir.param_alias[lp.var[base]]
            self.started[(node, src)] = (handle, views)


def unsharded(sbp: NdSbp, zero_axis: int) -> NdSbp:
    """``sbp`` replicated on the ZeRO axis: what a gathered parameter looks like."""
    return tuple(B if a == zero_axis else q for a, q in enumerate(sbp))
