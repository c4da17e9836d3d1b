"""Record what eager execution decided: each op's signature and every boxing it caused, with bytes.

``sf.compile`` records its first step and ``ParallelModule.explain()`` prints the record; the recorder
is off otherwise, so a step pays nothing for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from shardflow.boxing.plan import Plan
from shardflow.placement.sbp import NdSbp, format_sbp
from shardflow.tensor import fast_path


@dataclass
class OpRecord:
    op: str
    ins: tuple[NdSbp, ...]
    needed: tuple[NdSbp, ...]
    outs: tuple[NdSbp, ...]
    boxing: list[Plan] = field(default_factory=list)


@dataclass
class Record:
    ops: list[OpRecord] = field(default_factory=list)
    # boxing outside ops: (where, plan, how it runs when not by the plan's own route, e.g. in a bucket)
    other: list[tuple[str, Plan, str | None]] = field(default_factory=list)

    def explain(self) -> str:
        boxed = [r for r in self.ops if r.boxing]
        total = sum(p.bytes_per_rank for r in boxed for p in r.boxing) + sum(p.bytes_per_rank for _, p, _ in self.other)
        lines = [
            f"{len(self.ops)} ops, {len(boxed)} with boxing, {len(self.other)} other conversions; "
            f"{total / 2**20:.2f} MiB sent per rank per step (max over ranks)"
        ]
        kinds: dict[str, int] = {}
        for r in self.ops:
            kinds[r.op] = kinds.get(r.op, 0) + 1
        lines.append("ops: " + ", ".join(f"{k.replace('aten.', '')} x{n}" for k, n in sorted(kinds.items())))
        if boxed:
            lines.append("ops that needed boxing (op: input layouts -> needed -> outputs | route, bytes/rank):")
        for r in boxed:
            sig = ", ".join(map(format_sbp, r.ins)) + " -> " + ", ".join(map(format_sbp, r.needed))
            routes = "; ".join(f"{p.route} {p.bytes_per_rank} B" for p in r.boxing)
            lines.append(f"  {r.op}: {sig} -> {', '.join(map(format_sbp, r.outs))} | {routes}")
        if self.other:
            lines.append("other conversions (gradient layouts, losses, redistribute):")
            seen: dict[tuple[str, str, str], list[int]] = {}
            for where, p, how in self.other:
                key = (where, f"{format_sbp(p.src_sbp)} -> {format_sbp(p.dst_sbp)}", how or p.route)
                seen.setdefault(key, []).append(p.bytes_per_rank)
            for (where, conv, route), sizes in seen.items():
                lines.append(f"  {where}: {conv} by {route} x{len(sizes)}, {sum(sizes)} B/rank")
        return "\n".join(lines)


_ACTIVE: list[Record | None] = [None]
_CURRENT: list[OpRecord | None] = [None]


@contextlib.contextmanager
def recording() -> Iterator[Record]:
    """Record eager decisions made inside the block. The fast path forgets its calls, so that every op of
    the block reaches the recorder (nothing is remembered for it while one records)."""
    rec, old = Record(), _ACTIVE[0]
    _ACTIVE[0] = rec
    fast_path.HITS.clear()
    try:
        yield rec
    finally:
        _ACTIVE[0] = old
        fast_path.HITS.clear()  # what it saw while recording was refused: let it be decided again


def recording_active() -> bool:
    return _ACTIVE[0] is not None


def note_boxing(plan: Plan, where: str = "conversion") -> None:
    rec = _ACTIVE[0]
    if rec is None:
        return
    cur = _CURRENT[0]
    if cur is not None:
        cur.boxing.append(plan)
    else:
        rec.other.append((where, plan, None))


def begin_op(op: str, ins: tuple[NdSbp, ...], needed: tuple[NdSbp, ...], outs: tuple[NdSbp, ...]) -> OpRecord | None:
    rec = _ACTIVE[0]
    if rec is None:
        return None
    r = OpRecord(op, ins, needed, outs)
    rec.ops.append(r)
    _CURRENT[0] = r
    return r


def end_op() -> None:
    _CURRENT[0] = None
