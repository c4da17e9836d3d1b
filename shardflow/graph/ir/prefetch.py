"""The prefetch pass: start each ZeRO-3 gather while the gathering op before it computes (one op ahead).

A ``Gather`` of gathering op ``j + 1`` becomes a ``GatherStart`` right after op ``j``'s own gathers and a
finishing ``Box`` where it stood, when its plan is a single all-gather this rank can start and a variable
of its chain exists by then: the value itself, or a parameter it is a view of (``make_fx`` puts
``t(weight)`` right before its matmul), whose gathered copy then gets the views replayed.
"""

from __future__ import annotations

import functools
import math

from shardflow.boxing import can_start, finish_plan, plan_boxing, start_plan
from shardflow.graph.ir.gathers import gather_staging, unsharded
from shardflow.graph.ir.instr import Box, Comm, Gather, GatherStart, Instr, Link, Op
from shardflow.graph.ir.step import StepIR
from shardflow.placement.mesh import Mesh
from shardflow.placement.shard import local_shape


def prefetch(ir: StepIR, mesh: Mesh, rank: int, zero_axis: int) -> None:
    """Rewrite ``ir.body`` as the module docstring says; gathers that cannot start early stay as they are."""
    last_of: dict[int, int] = {}  # gathering op -> index of its last gather
    firsts: dict[int, list[Gather]] = {}  # gathering op -> its first gather of each value, in order
    seen: set[tuple[int, str]] = set()
    for i, ins in enumerate(ir.body):
        if isinstance(ins, Gather):
            last_of[ins.group] = i
            if (ins.group, ins.src) not in seen:
                seen.add((ins.group, ins.src))
                firsts.setdefault(ins.group, []).append(ins)
    if not last_of:
        return
    coord = mesh.coord_of(rank)
    started: dict[tuple[int, str], tuple[str, Link]] = {}
    defined: set[str] = set()
    body: list[Instr] = []
    for i, ins in enumerate(ir.body):
        key = (ins.group, ins.src) if isinstance(ins, Gather) else None
        made = _finish(ir, ins, *started.pop(key)) if key in started else [ins]  # type: ignore[arg-type]
        body += made
        for m in made:
            defined.update(m.defs)
        if isinstance(ins, Gather) and last_of[ins.group] == i:
            for later in firsts.get(ins.group + 1, []):
                link = next((link for link in later.chain if link.var in defined), None)
                if link is None:
                    continue
                full = unsharded(link.sbp, zero_axis)
                plan = plan_boxing(link.meta.shape, link.meta.dtype, mesh, link.sbp, mesh, full)
                if not can_start(plan, rank):
                    continue
                handle = ir.new_var()
                comm = Comm(ins.phase, "ZeRO-3 gather (prefetched)", plan.route, plan)
                fn = ir.const(functools.partial(start_plan, plan), "start")
                staging = gather_staging(mesh, coord, plan, link.meta, full)
                body.append(GatherStart(out=handle, src=link.var, fn=fn, route=plan.route, temp=staging, comm=comm))
                defined.add(handle)
                nbytes = math.prod(local_shape(link.meta.shape, full, mesh.shape, coord)) * link.meta.dtype.itemsize
                ir.store(handle, nbytes, f"ZeRO-3 gather, prefetched ({ins.phase})")
                if link.var in ir.param_alias:
                    ir.param_alias[handle] = ir.param_alias[link.var]
                started[(later.group, later.src)] = (handle, link)
    ir.body[:] = body


def _finish(ir: StepIR, gather: Gather, handle: str, link: Link) -> list[Instr]:
    """The started gather picked up where ``gather`` stood, the link's views replayed on it."""
    out: list[Instr] = []
    name = gather.out if not link.views else ir.new_var()
    out.append(Box(out=name, src=handle, fn=ir.const(finish_plan, "finish"), route="finish prefetched gather"))
    for n, (target, extra) in enumerate(link.views):
        prev, name = name, gather.out if n == len(link.views) - 1 else ir.new_var()
        args = ", ".join([prev, *([extra] if extra else [])])
        out.append(Op(out=name, fn=ir.const(target, "op"), args=args, used=(prev,)))
    # the gathered buffer is the started gather's: every variable holding it (views the layout pass made
    # of the gathered value too) now holds the handle's storage, counted once
    ir.move_storage(gather.out, handle)
    return out
