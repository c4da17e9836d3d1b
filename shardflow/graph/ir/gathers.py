"""ZeRO-3 gathers in the layout pass: a parameter stored split on the data-parallel axis is gathered
right before each op computing with it (views of it stay split) and freed after; backward gathers it again.

Each gather is a ``Gather`` instruction carrying what the prefetch pass (``ir/prefetch.py``) needs to start
it earlier: the gathering op's index and the chain of variables it could start from.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from shardflow.boxing.plan import Plan
from shardflow.graph.ir.instr import Box, Gather, Link
from shardflow.graph.ir.lookahead import is_tensor
from shardflow.graph.ir.step import Value
from shardflow.ops import TensorMeta
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, NdSbp, S
from shardflow.placement.shard import local_shape

if TYPE_CHECKING:
    from shardflow.graph.ir.layouts import LayoutPass

_aten = torch.ops.aten
VIEWS = {_aten.t.default, _aten.transpose.int, _aten.view.default, _aten._unsafe_view.default, _aten.detach.default}
# views without shape arguments: replayed on a gathered copy, they commute with the gather
_REPLAYED = {_aten.t.default, _aten.transpose.int, _aten.detach.default}


def unsharded(sbp: NdSbp, zero_axis: int) -> NdSbp:
    """``sbp`` replicated on the ZeRO axis: what a gathered parameter looks like."""
    return tuple(B if a == zero_axis else q for a, q in enumerate(sbp))


def gather_staging(mesh: Mesh, coord: tuple[int, ...], plan: Plan, meta: TensorMeta, need: NdSbp) -> int:
    """Bytes an all-gather in ``plan`` holds for a moment beyond its result: gloo (CPU) stages the whole
    output. A gather along a dim that is not outermost receives into a buffer of blocks, sending a
    contiguous copy of this rank's strided piece, and is assembled by one ``cat``: the larger moment."""
    gathers = [s for s in plan.steps if s.kind == "all_gather"]
    if not gathers:
        return 0

    def nbytes(sbp: NdSbp) -> int:
        return math.prod(local_shape(meta.shape, sbp, mesh.shape, coord)) * meta.dtype.itemsize

    out = nbytes(need)
    staging = out if mesh.device_type == "cpu" else 0
    shape = local_shape(meta.shape, need, mesh.shape, coord)
    split = gathers[-1].src[gathers[-1].axis]
    if isinstance(split, S) and math.prod(shape[: split.dim]) != 1:
        return max(staging + nbytes(plan.src_sbp), out)
    return staging


def gathering_ops(graph: fx.Graph, params: list[fx.Node], sharded: set[fx.Node]) -> dict[fx.Node, int]:
    """The ops that will gather sharded parameters (or views of them), numbered in graph order."""
    sharded = {n for n in params if n in sharded}
    known = set(params)
    out: dict[fx.Node, int] = {}
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
        if any(a in sharded for a in tensors):
            out[node] = len(out)
    return out


def gather(lp: LayoutPass, node: fx.Node, src: fx.Node, meta: TensorMeta, sbp: NdSbp, full: NdSbp) -> str:
    """Emit the gather of ``src`` for op ``node`` (a ``Gather``); its variable."""
    name, _ = lp.box_from(lp.var[src], meta, sbp, full, "ZeRO-3 gather")
    box = lp.ir.body[-1]
    assert isinstance(box, Box)
    fields = {k: getattr(box, k) for k in ("out", "src", "fn", "route", "temp", "comm")}
    lp.ir.body[-1] = Gather(**fields, group=lp.gathering[node], phase=lp.phase, chain=_chain(lp, src))
    return name


def _chain(lp: LayoutPass, src: fx.Node) -> tuple[Link, ...]:
    """``src`` and what it is a view of, through views that commute with a gather."""
    links: list[Link] = []
    views: list[tuple[object, str]] = []
    node = src
    while True:
        value = lp.info.get(node)
        if node in lp.var and isinstance(value, Value):
            links.append(Link(lp.var[node], value.sbp, value.meta, tuple(reversed(views))))
        if node.target not in _REPLAYED or not isinstance(node.args[0], fx.Node):
            return tuple(links)
        views.append((node.target, ", ".join(repr(a) for a in node.args[1:])))
        node = node.args[0]
