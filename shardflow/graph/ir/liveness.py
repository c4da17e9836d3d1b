"""Liveness and the memory timeline: how many bytes a program holds at each instruction.

A storage lives from the instruction making the first variable that holds it to the last use of any
variable holding it; an instruction's ``temp`` bytes live only while it runs. Releases are not instructions
(they compute nothing), so they take no line here. What the timeline predicts is what the program's
``del`` lines free (``ir/codegen.py`` deletes each variable after its last use).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shardflow.graph.ir.instr import Instr
from shardflow.graph.ir.step import StepIR
from shardflow.runtime.memory import ProgramMemory


def last_uses(body: Sequence[Instr]) -> dict[str, int]:
    """Each variable's last instruction (a value never used dies where it is made)."""
    last: dict[str, int] = {}
    for i, ins in enumerate(body):
        for name in [*ins.defs, *ins.uses]:
            last[name] = i
    return last


def spans(body: Sequence[Instr], holds: Mapping[str, Any], last: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """Each storage's first and last instruction: from the one making the first variable that holds it (per
    ``holds``: variable -> its storage keys) to the last use (per ``last``) of any of them."""
    first: dict[str, int] = {}
    for i, ins in enumerate(body):
        for name in ins.defs:
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


def timeline(ir: StepIR, returned: Sequence[str], arena: int = 0) -> ProgramMemory:
    """Bytes the program holds instruction by instruction, its peak, what is alive there, and what it
    returns (``returned[1:]``: the gradients). ``arena``: bytes of placed blocks, held whole throughout."""
    body = ir.body
    span = spans(body, ir.refs, last_uses(body))
    for key in ir.placed:  # in the arena, held whole from the first run on
        span.pop(key, None)
    delta = [0] * (len(body) + 1)
    delta[0] = arena
    for key, (a, b) in span.items():
        delta[a] += ir.storages[key].nbytes
        delta[b + 1] -= ir.storages[key].nbytes
    live, peak, at = 0, 0, 0
    for i, ins in enumerate(body):
        live += delta[i]
        if live + ins.temp > peak:
            peak, at = live + ins.temp, i
    alive = sorted(
        ((ir.storages[k].nbytes, ir.storages[k].label) for k, (a, b) in span.items() if a <= at <= b), reverse=True
    )
    if arena:
        alive.append((arena, f"arena of {len(ir.placed)} temporaries placed by lifetime (graph/arena.py)"))
        alive.sort(reverse=True)
    if body[at].temp:
        alive.append((body[at].temp, "temporaries of the op there (its own, or a collective's staging copies)"))
    kept = {k for v in returned[1:] for k in ir.refs.get(v, [])}
    ends = [0] * len(body)
    for key, (_, b) in span.items():
        ends[b] += ir.storages[key].nbytes
    live_at, running = [], 0  # after each instruction, once what dies there is freed (where updates run)
    for i in range(len(body)):
        running += delta[i]
        live_at.append(running - ends[i])
    gradients = sum(ir.storages[k].nbytes for k in kept)
    return ProgramMemory(peak, alive, gradients, body[at].code(), tuple(live_at), arena)


def saved(ir: StepIR) -> list[str]:
    """A stage's variables made by its forward and used by its backward (what the forward returns)."""
    lines = ir.merged()
    k = next(j for j, (_, i) in enumerate(lines) if i == ir.split_at())
    order = {n: j for j, (ins, _) in enumerate(lines[:k]) for n in ins.defs}  # made by the forward, in order
    return sorted({n for ins, _ in lines[k:] for n in ins.uses if n in order}, key=order.__getitem__)


def saved_bytes(ir: StepIR) -> int:
    """Bytes of the storages a stage's forward keeps for its backward (views of parameters hold none)."""
    if ir.split_at() is None:
        return 0
    keys = {key for name in saved(ir) for key in ir.refs.get(name, [])}
    return sum(ir.storages[key].nbytes for key in keys)
