"""What a layout choice costs later: the demands of gradients on the ops computing them, and one step of
lookahead pricing an op's output layouts by its consumers' cheapest signatures.

Op-by-op choices cannot see what a layout costs downstream (a reduce-scatter that a column-parallel
linear must then all-gather loses to one all-reduce), so the layout pass prices each candidate output
layout by what the consumers will need, quickly (``estimate_seconds``), a few single-input ops deep.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from shardflow.boxing import estimate_seconds
from shardflow.graph.ir.step import Value
from shardflow.ops import OpCall, TensorMeta
from shardflow.ops.select import candidates, communicates, reduces_to_split
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import NdSbp, Placement, is_split


def is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


@dataclass(frozen=True)
class _Consumer:
    """A consumer's tensor inputs, their metadata and its distinct (input layouts, first output layout)."""

    nodes: list[fx.Node]
    metas: list[TensorMeta]
    combos: list[tuple[tuple[NdSbp, ...], NdSbp | None]]


def demands(
    graph: fx.Graph, wanted: Mapping[fx.Node, NdSbp], mesh: Mesh, blocks: Sequence[int]
) -> dict[fx.Node, tuple[Placement | None, ...]]:
    """Layouts later consumers need, known before the forward pass chooses: a gradient split like its
    parameter (``wanted``: gradient node -> its returned layout), carried back through single-input ops
    (``t``, ``view``) to the op computing it, so that op computes it split instead of as partial sums
    needing a reduce-scatter afterwards. Replicated gradients add no demand: their all-reduce runs in a
    bucket, overlapped."""
    want: dict[fx.Node, tuple[Placement | None, ...]] = {}
    for node, sbp in wanted.items():
        if any(is_split(p) for p in sbp):
            want[node] = tuple(p if is_split(p) else None for p in sbp)
    for node in reversed(graph.nodes):
        d = want.get(node)
        if d is None or node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        flat, spec = tree_flatten((node.args, node.kwargs))
        where = [i for i, a in enumerate(flat) if isinstance(a, fx.Node) and is_tensor(a)]
        if len(where) != 1 or len(flat[where[0]].users) != 1 or not is_tensor(node):
            continue
        src: fx.Node = flat[where[0]]
        meta = TensorMeta(tuple(src.meta["val"].shape), src.meta["val"].dtype)
        flat[where[0]] = meta
        margs, mkwargs = tree_unflatten(flat, spec)
        din: list[Placement | None] = []
        for axis, sigs in enumerate(
            candidates(OpCall(node.target, tuple(margs), dict(mkwargs), (meta,)), mesh, blocks=blocks)
        ):
            match = next((sig for sig in sigs if sig.outs[:1] == (d[axis],)), None) if d[axis] else None
            if d[axis] is not None and match is None:
                break
            din.append(match.ins[0] if match else None)
        else:
            if any(p is not None for p in din):
                want[src] = tuple(din)
    return want


class Lookahead:
    """Prices an op's output layouts by its consumers (see the module docstring). ``info`` and ``params``
    are the layout pass's own, read as they grow: layouts chosen so far, parameters pinned in place."""

    def __init__(
        self,
        mesh: Mesh,
        blocks: Sequence[int],
        reduce_to_split: bool,
        info: Mapping[fx.Node, Any],
        params: set[fx.Node],
    ) -> None:
        self.mesh, self.blocks, self.reduce_to_split, self.info, self.params = (
            mesh,
            blocks,
            reduce_to_split,
            info,
            params,
        )
        self.costs: dict[tuple[fx.Node, fx.Node, NdSbp], float] = {}
        self.consumers: dict[fx.Node, _Consumer | None] = {}

    def pricer(self, node: fx.Node, out_metas: list[TensorMeta | None]) -> Callable[[tuple[NdSbp, ...]], float] | None:
        """What each choice of output layouts will cost the node's consumers: for every consumer, its
        cheapest signature given that layout and the layouts of its other inputs known so far."""
        tensors = [i for i, m in enumerate(out_metas) if m is not None]
        uses: list[tuple[int, fx.Node, fx.Node]] = []  # (tensor output index, consumer, node it reads)
        if is_tensor(node):
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
        """The cheapest boxing ``user`` needs when ``src`` arrives in ``layout``. Through ops with one tensor
        input and one output (views, transposes, element-wise) it looks on, up to 3 ops deeper: a partial
        sum that a view passes along is paid for where something finally needs it reduced."""
        key = (user, src, layout)
        if key in self.costs:
            return self.costs[key]
        best, consumer = 0.0, self.consumer(user)
        if consumer is not None:
            passes_on = len(consumer.nodes) == 1 and is_tensor(user) and depth < 3
            best = math.inf
            for needs, out in consumer.combos:
                total = 0.0
                for a, meta, need in zip(consumer.nodes, consumer.metas, needs):
                    value = self.info.get(a)
                    cur = layout if a is src else (value.sbp if isinstance(value, Value) else None)
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
        self.costs[key] = best
        return best

    def consumer(self, user: fx.Node) -> _Consumer | None:
        """``user``'s inputs and signatures; None where lookahead does not apply (no ATen op, no rule, too
        many signatures)."""
        if user in self.consumers:
            return self.consumers[user]
        found = None
        if user.op == "call_function" and isinstance(user.target, torch._ops.OpOverload):
            flat, spec = tree_flatten((user.args, user.kwargs))
            where = [i for i, a in enumerate(flat) if isinstance(a, fx.Node) and is_tensor(a)]
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
                found = _Consumer(nodes, metas, list(combos))
        self.consumers[user] = found
        return found
