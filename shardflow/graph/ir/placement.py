"""Arena placement: give an op's new storages blocks of one arena, reused by lifetime (graph/arena.py).

Only ops with an ``out=`` overload (``Op.out_form``) are placed. A storage's lifetime runs to the last use
of any variable that may hold it: as recorded for exact instructions, and through any other (boxing),
whose results may hold any storage of their inputs. Inputs of asynchronous work live to the end. What
the program returns or hands to the update is never placed: a step's gradients must outlive it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from shardflow.graph.arena import Arena, assign, select
from shardflow.graph.ir.instr import Op
from shardflow.graph.ir.liveness import last_uses, spans
from shardflow.graph.ir.step import StepIR


def may_hold(ir: StepIR) -> tuple[dict[str, set[str]], dict[str, int]]:
    """Per variable the storages it may hold, and per variable its last use (asynchronous inputs: the end)."""
    may: dict[str, set[str]] = {}
    last = last_uses(ir.body)
    for ins in ir.body:
        for d in ins.defs:
            own = set(ir.refs.get(d, []))
            if ins.exact:  # a view inherits what its source may hold besides its own storages
                extra = {
                    k for u in ins.uses if own & set(ir.refs.get(u, [])) for k in may.get(u, set()) - set(ir.refs[u])
                }
            else:
                extra = {k for u in ins.uses for k in may.get(u, set(ir.refs.get(u, [])))}
            may[d] = own | extra
        if ins.asynchronous:
            for u in ins.uses:
                last[u] = len(ir.body)
    return may, last


def place(ir: StepIR, kept: Sequence[str], everything: bool) -> Arena | None:
    """Place the placeable storages not in ``kept`` (nor handed to the update), rewriting their ops to
    write into blocks; the arena, or None if nothing was placed. ``everything``: every storage that can
    be placed; otherwise only those that lower the peak of arena and allocator together (``select``)."""
    may, last = may_hold(ir)
    handed = [n for rs in ir.releases.values() for r in rs for n in r.uses]
    excluded = {k for v in [*kept, *handed] for k in may.get(v, set(ir.refs.get(v, [])))}
    ops = {
        i: ins
        for i, ins in enumerate(ir.body)
        if isinstance(ins, Op) and ins.out_form is not None and not excluded & set(ins.out_form.keys)
    }
    span = spans(ir.body, may, last)
    blocks = {key: (ir.storages[key].nbytes, *span[key]) for ins in ops.values() for key in _keys(ins)}
    # what stays with the allocator, line by line: the arena is held whole, so only blocks that lower the
    # peak of both together are placed (an op's outputs all, or none)
    base = [0] * (len(ir.body) + 1)
    for key, (a, b) in spans(ir.body, ir.refs, last_uses(ir.body)).items():
        if key not in blocks:
            base[a] += ir.storages[key].nbytes
            base[b + 1] -= ir.storages[key].nbytes
    base = list(itertools.accumulate(base))[: len(ir.body)]
    for i, ins in enumerate(ir.body):
        base[i] += ins.temp
    chosen = set(blocks) if everything else select(blocks, base)
    ops = {i: ins for i, ins in ops.items() if all(key in chosen for key in _keys(ins))}
    if not ops:
        return None
    blocks = {key: blocks[key] for ins in ops.values() for key in _keys(ins)}
    offsets, nbytes = assign(blocks)
    order = sorted(blocks, key=lambda k: (offsets[k], k))
    ir.placed = {key: j for j, key in enumerate(order)}
    shapes = {k: s for ins in ops.values() for k, s in zip(_keys(ins), ins.out_form.shapes)}  # type: ignore[union-attr]
    arena = Arena(nbytes, [(offsets[k], *shapes[k]) for k in order])
    for i, ins in ops.items():
        ir.body[i] = dataclasses.replace(ins, blocks=tuple(ir.placed[k] for k in _keys(ins)))
    return arena


def _keys(op: Op) -> tuple[str, ...]:
    assert op.out_form is not None
    return op.out_form.keys
