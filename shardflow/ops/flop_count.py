"""``Flops``: the FLOPs of one training step, by phase and by ATen op, and how a traced graph is counted.

A step's ops are counted once each by ``ops/flops/``'s formulas: on a traced graph's global shapes this is
the logical step, the same for every plan of a model and batch; on one rank's lowered program (its local
shapes) it is what that rank computes, replicated work included. Recomputed forwards (activation
checkpointing, a fused attention backward's scores) are hardware work: counted apart, never in ``total``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_map

from shardflow.ops.flops import OpFlops, op_flops

RECOMPUTED = "sf_recompute"  # set in a node's ``meta["custom"]`` when a checkpointed forward runs again


@dataclass(frozen=True)
class Flops:
    """FLOPs of one step of the global batch (multiply-add = 2; conventions in ``ops/flops/``).

    ``forward`` and ``backward`` are model work, each logical op counted once whatever the plan; ``total`` is
    their sum. ``recompute``: hardware FLOPs of recomputed forwards, not in ``total``; the optimizer is not
    counted. ``by_op``: model FLOPs per ATen op (``"aten.mm"``), summing to ``total``; ``matmul``: the part
    of each that is matmul, convolution or attention products. ``uncounted``: ops met without a formula
    (counted 0). ``rank``: what this rank computes (its local shapes, replicated work included)."""

    forward: int = 0
    backward: int = 0
    recompute: int = 0
    by_op: Mapping[str, int] = field(default_factory=dict)
    matmul: Mapping[str, int] = field(default_factory=dict)
    uncounted: tuple[str, ...] = ()
    rank: Flops | None = None

    @property
    def total(self) -> int:
        return self.forward + self.backward

    @property
    def matmul_total(self) -> int:
        """The FLOPs of matmuls, convolutions and attention products (what ``torch.utils.flop_counter`` counts)."""
        return sum(self.matmul.values())

    def __add__(self, other: Flops) -> Flops:
        """Two steps' work together (a pipeline stage's micro-batches)."""
        rank = self.rank + other.rank if self.rank is not None and other.rank is not None else None
        return Flops(
            self.forward + other.forward,
            self.backward + other.backward,
            self.recompute + other.recompute,
            _summed(self.by_op, other.by_op),
            _summed(self.matmul, other.matmul),
            tuple(sorted(set(self.uncounted) | set(other.uncounted))),
            rank,
        )

    def with_rank(self, rank: Flops) -> Flops:
        return dataclasses.replace(self, rank=rank)

    def explain(self, top: int = 8) -> str:
        """A few lines for people: the totals and the ops doing most of the work."""
        lines = [
            f"FLOPs per step: {in_flops(self.total)} (forward {in_flops(self.forward)}, backward {in_flops(self.backward)}"
            + (f"; recomputed {in_flops(self.recompute)} more" if self.recompute else "")
            + f"); matmuls, convolutions and attention {self.matmul_total / max(self.total, 1):.0%}"
        ]
        largest = sorted(self.by_op.items(), key=lambda kv: -kv[1])[:top]
        width = max((len(op) for op, _ in largest), default=0)
        for op, n in largest:
            lines.append(f"  {op:<{width}}  {in_flops(n):>11}  {n / max(self.total, 1):6.1%}")
        if self.rank is not None:
            lines.append(
                f"this rank computes {in_flops(self.rank.total)} (+{in_flops(self.rank.recompute)} recomputed)"
            )
        if self.uncounted:
            lines.append(f"ops without a formula (counted 0): {', '.join(self.uncounted)}")
        return "\n".join(lines)


def _summed(a: Mapping[str, int], b: Mapping[str, int]) -> Mapping[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def in_flops(n: float) -> str:
    """``n`` FLOPs for people, with an SI prefix: ``"1.23 GFLOP"``."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}FLOP"
    return f"{n:.0f} FLOP"


class FlopTally:
    """Adds ops' FLOPs up by phase (``"forward"``, ``"backward"``, ``"recompute"``) into a ``Flops``."""

    def __init__(self) -> None:
        self.phases = {"forward": 0, "backward": 0, "recompute": 0}
        self.by_op: dict[str, int] = {}
        self.matmul: dict[str, int] = {}
        self.uncounted: set[str] = set()

    def add(self, op: str, phase: str, flops: OpFlops | None) -> None:
        if flops is None:
            self.uncounted.add(op)
            return
        if phase == "recompute":  # a checkpointed forward again: all of it is hardware work
            self.phases["recompute"] += flops.total + flops.recompute
            return
        self.phases[phase] += flops.total
        self.phases["recompute"] += flops.recompute
        if flops.total:
            self.by_op[op] = self.by_op.get(op, 0) + flops.total
        if flops.matmul:
            self.matmul[op] = self.matmul.get(op, 0) + flops.matmul

    def result(self) -> Flops:
        p = self.phases
        return Flops(
            p["forward"],
            p["backward"],
            p["recompute"],
            dict(self.by_op),
            dict(self.matmul),
            tuple(sorted(self.uncounted)),
        )


def op_name(func: Any) -> str:
    """The name ``by_op`` keys an ATen op by: ``aten.mm`` for ``aten.mm.default``."""
    return str(func.overloadpacket)


def recomputed(node: fx.Node) -> bool:
    return bool((node.meta.get("custom") or {}).get(RECOMPUTED))


def graph_flops(graph: fx.Graph, forward_end: fx.Node | None) -> Flops:
    """The FLOPs of a traced graph's ops on the shapes it was traced with (``node.meta["val"]``): forward up to
    and including ``forward_end`` (None: all of it), backward after it, nodes tagged ``RECOMPUTED`` apart."""
    tally = FlopTally()
    phase = "forward"
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            args, kwargs = tree_map(_value, (node.args, node.kwargs))
            val = node.meta.get("val")
            outs = [o for o in tree_flatten(val)[0] if isinstance(o, torch.Tensor)]
            tally.add(
                op_name(node.target),
                "recompute" if recomputed(node) else phase,
                op_flops(node.target, args, kwargs, outs),
            )
        if node is forward_end:
            phase = "backward"
    return tally.result()


def _value(a: Any) -> Any:
    return a.meta.get("val") if isinstance(a, fx.Node) else a
