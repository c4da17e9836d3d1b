"""The boxing planner: (shape, dtype, source mesh + nd-SBP, target mesh + nd-SBP) -> a list of steps.

Pure: it never touches a process group, so every rank computes the same plan and tests need no processes.
On one mesh, routes are shortest paths (by ``CostModel``) over nd-SBPs, each edge changing one mesh axis
with a 1-d conversion (all-gather, reduce-scatter, all-reduce, all-to-all, slice, …). An edge on axis
``a`` is legal only when no later axis splits a dim that the edge touches: later axes split the piece of
earlier ones, so converting an outer split under an inner one would scramble rows (``(S(0), S(0))``). Between different meshes, the source first drops
its ``P`` axes on its own mesh (cheapest way, usually reduce-scatter), then every target rank receives the
boxes it needs point-to-point from the holders (a rank in both meshes copies locally); target ``P`` axes
receive on their first coordinate and fill zeros elsewhere. A ``Blocked`` layout is planned on the view
where it is a plain split (``shard.unflatten``); its steps carry that ``view`` shape, and a conversion with
no common view goes through the layout with the blocks gathered (``B``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch

from shardflow.boxing.cost import DEFAULT_COST, CostModel
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, Blocked, NdSbp, P, S, _Partial, format_sbp
from shardflow.placement.shard import (
    Box,
    blocked_of,
    box_shape,
    has_shards,
    intersect,
    max_local_shape,
    shard_box,
    unflatten,
    view_of,
)

COLLECTIVES = {"all_gather", "reduce_scatter", "all_reduce", "all_to_all"}


@dataclass(frozen=True)
class Transfer:
    """``box`` of the global tensor goes from global rank ``src`` to global rank ``dst``."""

    src: int
    dst: int
    box: Box


@dataclass(frozen=True)
class Step:
    """One conversion. Same-mesh steps act on mesh ``axis``; ``send_recv`` moves boxes between meshes."""

    kind: str  # all_gather | reduce_scatter | all_reduce | all_to_all | slice | mask | pad | send_recv
    src_mesh: Mesh
    dst_mesh: Mesh
    src: NdSbp
    dst: NdSbp
    axis: int
    bytes_per_rank: int
    seconds: float
    transfers: tuple[Transfer, ...] = ()
    view: tuple[int, ...] | None = None  # the shape the step sees (src/dst are its layouts there); None: the plan's

    def describe(self) -> str:
        if self.kind == "send_recv":
            where = f"{len(self.transfers)} transfers {self.src_mesh} -> {self.dst_mesh}"
        else:
            where = f"axis {self.src_mesh.names[self.axis]!r} (size {self.src_mesh.shape[self.axis]})"
        if self.view is not None:
            where += f" on view {self.view}"
        return (
            f"{self.kind:<14} {where}: {format_sbp(self.src)} -> {format_sbp(self.dst)}"
            f"  {_fmt_bytes(self.bytes_per_rank)}/rank  ~{self.seconds * 1e3:.3f} ms"
        )


@dataclass(frozen=True)
class Plan:
    """A route from one layout to another; ``explain()`` prints it for people."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    src_mesh: Mesh
    src_sbp: NdSbp
    dst_mesh: Mesh
    dst_sbp: NdSbp
    steps: tuple[Step, ...]
    bytes_per_rank: int = field(init=False)
    seconds: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bytes_per_rank", sum(s.bytes_per_rank for s in self.steps))
        object.__setattr__(self, "seconds", sum(s.seconds for s in self.steps))

    @property
    def route(self) -> str:
        """Step kinds joined by ``+``; ``identity`` for an empty plan."""
        return " + ".join(s.kind for s in self.steps) or "identity"

    def explain(self) -> str:
        meshes = str(self.src_mesh) if self.src_mesh == self.dst_mesh else f"{self.src_mesh} -> {self.dst_mesh}"
        head = (
            f"boxing {format_sbp(self.src_sbp)} -> {format_sbp(self.dst_sbp)} on {meshes}, "
            f"shape {tuple(self.shape)} {str(self.dtype).replace('torch.', '')}: {len(self.steps)} step(s), "
            f"{_fmt_bytes(self.bytes_per_rank)}/rank, ~{self.seconds * 1e3:.3f} ms"
        )
        return "\n".join([head] + [f"  {i + 1}. {s.describe()}" for i, s in enumerate(self.steps)])


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _dims(p: object) -> set[int]:
    return {p.dim} if isinstance(p, S) else set()


def _direct(cur: NdSbp, axis: int, new: object) -> bool:
    """May ``axis`` change from ``cur[axis]`` to ``new`` with the 1-d conversion of its group?"""
    touched = _dims(cur[axis]) | _dims(new)
    return not any(isinstance(p, S) and p.dim in touched for p in cur[axis + 1 :])


def _kind(old: object, new: object) -> str:
    if isinstance(old, S):
        return "all_to_all" if isinstance(new, S) else ("all_gather" if new is B else "pad")
    if isinstance(old, _Partial):
        return "all_reduce" if new is B else "reduce_scatter"
    return "slice" if isinstance(new, S) else "mask"  # from B


@lru_cache(maxsize=65536)  # the search prices the same (shape, layout) from many states
def _nbytes(shape: Sequence[int], sbp: NdSbp, mesh: Mesh, itemsize: int) -> int:
    return math.prod(max_local_shape(shape, sbp, mesh.shape)) * itemsize


def _edge(
    shape: tuple[int, ...], itemsize: int, mesh: Mesh, cur: NdSbp, axis: int, new: object, cost: CostModel
) -> Step:
    nxt: NdSbp = cur[:axis] + (new,) + cur[axis + 1 :]  # type: ignore[assignment]
    kind, k = _kind(cur[axis], new), mesh.shape[axis]
    inb, outb = _nbytes(shape, cur, mesh, itemsize), _nbytes(shape, nxt, mesh, itemsize)
    if kind in COLLECTIVES:
        full = {"all_gather": outb, "reduce_scatter": inb}.get(kind, inb)
        sent = {
            "all_gather": (k - 1) * inb,
            "reduce_scatter": (k - 1) * outb,
            "all_reduce": 2 * (k - 1) * inb // k,
            "all_to_all": (k - 1) * inb // k,
        }[kind]
        secs = cost.collective(kind, k, full)
    else:
        sent, secs = 0, cost.local(outb)
    return Step(kind, mesh, mesh, cur, nxt, axis, sent, secs)  # type: ignore[arg-type]


def _search(
    shape: tuple[int, ...], itemsize: int, mesh: Mesh, src: NdSbp, done: Callable[[NdSbp], bool], cost: CostModel
) -> tuple[Step, ...]:
    """Cheapest sequence of legal single-axis edges from ``src`` to a layout where ``done`` holds."""
    options: list[object] = [B, P] + [S(d) for d in range(len(shape))]
    best: dict[NdSbp, float] = {src: 0.0}
    heap: list[tuple[float, int, int, NdSbp, tuple[Step, ...]]] = [(0.0, 0, 0, src, ())]
    tick = 0
    while heap:
        secs, nsteps, _, cur, path = heapq.heappop(heap)
        if done(cur):
            return path
        if secs > best.get(cur, math.inf):
            continue
        for axis in range(mesh.ndim):
            for new in options:
                if new == cur[axis] or not _direct(cur, axis, new):
                    continue
                step = _edge(shape, itemsize, mesh, cur, axis, new, cost)
                total = secs + step.seconds
                if total < best.get(step.dst, math.inf) - 1e-15:
                    best[step.dst] = total
                    tick += 1
                    heapq.heappush(heap, (total, nsteps + 1, tick, step.dst, path + (step,)))
    raise AssertionError(f"no route from {format_sbp(src)} on {mesh}")  # every layout reaches all-B


def _holders(shape: tuple[int, ...], mesh: Mesh, sbp: NdSbp) -> dict[Box, list[int]]:
    """Distinct source boxes (P-free layout) and the ranks holding each, in mesh order."""
    out: dict[Box, list[int]] = {}
    for r in mesh.ranks:
        out.setdefault(shard_box(shape, sbp, mesh.shape, mesh.coord_of(r)), []).append(r)
    return out


def _send_recv(
    shape: tuple[int, ...], itemsize: int, src_mesh: Mesh, src: NdSbp, dst_mesh: Mesh, dst: NdSbp, cost: CostModel
) -> Step:
    holders = _holders(shape, src_mesh, src)
    as_b = tuple(B if isinstance(p, _Partial) else p for p in dst)
    transfers = []
    for i, r in enumerate(dst_mesh.ranks):
        coord = dst_mesh.coord_of(r)
        if any(isinstance(p, _Partial) and c != 0 for p, c in zip(dst, coord)):
            continue  # a P coordinate other than the first holds zeros
        need = shard_box(shape, as_b, dst_mesh.shape, coord)
        for box, ranks in holders.items():
            part = intersect(need, box)
            if part is None:
                continue
            giver = r if r in ranks else ranks[i % len(ranks)]
            transfers.append(Transfer(giver, r, part))
    sent: dict[int, int] = {}
    msgs: dict[int, int] = {}
    for t in transfers:
        if t.src != t.dst:
            sent[t.src] = sent.get(t.src, 0) + math.prod(box_shape(t.box)) * itemsize
            msgs[t.src] = msgs.get(t.src, 0) + 1
    most = max(sent.values(), default=0)
    secs = cost.p2p(most, max(msgs.values(), default=0))
    return Step("send_recv", src_mesh, dst_mesh, src, dst, -1, most, secs, tuple(transfers))


@lru_cache(maxsize=65536)
def plan_boxing(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    src_mesh: Mesh,
    src_sbp: NdSbp,
    dst_mesh: Mesh,
    dst_sbp: NdSbp,
    cost: CostModel = DEFAULT_COST,
) -> Plan:
    """Plan the conversion of a ``shape`` tensor; cached, so compiled graphs and eager calls share plans."""
    shape = tuple(int(n) for n in shape)
    if blocked_of(src_sbp) is not None or blocked_of(dst_sbp) is not None:
        steps = _blocked_steps(shape, dtype, src_mesh, src_sbp, dst_mesh, dst_sbp, cost)
        return Plan(shape, dtype, src_mesh, src_sbp, dst_mesh, dst_sbp, steps)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if src_mesh == dst_mesh:
        steps = _search(shape, itemsize, src_mesh, src_sbp, lambda s: s == dst_sbp, cost)
    else:
        steps = _search(shape, itemsize, src_mesh, src_sbp, lambda s: not any(isinstance(p, _Partial) for p in s), cost)
        mid = steps[-1].dst if steps else src_sbp
        steps += (_send_recv(shape, itemsize, src_mesh, mid, dst_mesh, dst_sbp, cost),)
    return Plan(shape, dtype, src_mesh, src_sbp, dst_mesh, dst_sbp, steps)


def _gathered(sbp: NdSbp) -> NdSbp:
    return tuple(B if isinstance(p, Blocked) else p for p in sbp)


def _blocked_steps(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    src_mesh: Mesh,
    src: NdSbp,
    dst_mesh: Mesh,
    dst: NdSbp,
    cost: CostModel,
) -> tuple[Step, ...]:
    """Steps of a conversion from or to a ``Blocked`` layout: planned on the view where both are plain
    splits, or (no common view) through ``src`` with its blocks gathered."""
    a, b = view_of(shape, src), view_of(shape, dst)
    src_bl, dst_bl = blocked_of(src), blocked_of(dst)
    if src_bl is None and dst_bl is not None:
        b_src = unflatten(shape, (dst_bl, *src))  # src on dst's view
        if b_src is not None:
            a = (b[0], b_src[1][1:])
    elif dst_bl is None and src_bl is not None:
        a_dst = unflatten(shape, (src_bl, *dst))
        if a_dst is not None:
            b = (a[0], a_dst[1][1:])
    if a[0] == b[0] and (blocked_of(src) is None or blocked_of(dst) is None or blocked_of(src) == blocked_of(dst)):
        inner = plan_boxing(a[0], dtype, src_mesh, a[1], dst_mesh, b[1], cost)
        return tuple(replace(s, view=a[0]) for s in inner.steps)
    if blocked_of(src) is not None:  # gather the blocks first, on the source mesh
        mid, mesh = _gathered(src), src_mesh
    else:  # reach dst with its blocks gathered, then slice them out on the target mesh
        mid, mesh = _gathered(dst), dst_mesh
    first = plan_boxing(shape, dtype, src_mesh, src, mesh, mid, cost)
    return first.steps + plan_boxing(shape, dtype, mesh, mid, dst_mesh, dst, cost).steps


@lru_cache(maxsize=65536)
def estimate_seconds(
    shape: tuple[int, ...], dtype: torch.dtype, mesh: Mesh, src: NdSbp, dst: NdSbp, cost: CostModel = DEFAULT_COST
) -> float:
    """A quick price of ``src -> dst`` on one mesh: one 1-d step per differing axis, in axis order, without
    the search (``plan_boxing`` finds the legal and cheapest order). For ranking many hypothetical
    conversions, as the compiler's lookahead does, where planning each one exactly would cost seconds."""
    if blocked_of(src) is not None or blocked_of(dst) is not None:
        if not (has_shards(src) and has_shards(dst)):
            return math.inf
        return plan_boxing(tuple(shape), dtype, mesh, src, mesh, dst, cost).seconds
    itemsize = torch.empty((), dtype=dtype).element_size()
    total, cur = 0.0, src
    for axis, new in enumerate(dst):
        if cur[axis] != new:
            step = _edge(tuple(shape), itemsize, mesh, cur, axis, new, cost)
            total, cur = total + step.seconds, step.dst
    return total


__all__ = ["Plan", "Step", "Transfer", "estimate_seconds", "plan_boxing"]
