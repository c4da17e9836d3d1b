"""A step program's instructions, printed for people: one line each, with what it runs, its layout
conversion or collective, and the bytes of what it makes; the update releases in place.

This is the text the golden test checks in (tests/graph/golden/), so a change to any pass shows up as a
readable diff of the program, not of generated Python.
"""

from __future__ import annotations

from shardflow.graph.ir.instr import Box, Gather, GatherStart, Instr, Item, Launch, Op, Release, Return, Unpack, Wait
from shardflow.graph.ir.step import StepIR
from shardflow.runtime.memory import fmt_bytes


def explain(ir: StepIR) -> str:
    """The listing of ``ir`` (see the module docstring)."""
    rows = []
    for ins, i in ir.merged():
        kind, text = _describe(ir, ins)
        made = [ir.storages[k].nbytes for d in ins.defs for k in ir.refs.get(d, []) if k == d or k.startswith(f"{d}#")]
        size = fmt_bytes(sum(made)) if made else ""
        where = f"{i:4d}" if i is not None else "    "
        rows.append(f"{where}  {kind:<8} {text}" + (f"  [{size}]" if size else ""))
    return "\n".join(rows) + "\n"


def _name(ir: StepIR, const: str) -> str:
    value = ir.consts.get(const)
    return str(value) if value is not None else const


def _describe(ir: StepIR, ins: Instr) -> tuple[str, str]:
    if isinstance(ins, Unpack):
        return "args", f"{len(ins.names)} from {ins.source}"
    if isinstance(ins, Op):
        checks = " ".join(str(shape) for _, shape in ins.checks)
        placed = f" into arena blocks {list(ins.blocks)}" if ins.blocks else ""
        return "op", f"{ins.out} = {ins.op or _name(ir, ins.fn)}({', '.join(ins.uses)})" + (
            f" -> {checks}" if checks else ""
        ) + placed
    if isinstance(ins, Item):
        return "item", f"{ins.out} = {ins.src}[{ins.index}]"
    if isinstance(ins, GatherStart):
        return "start", f"{ins.out} = {ins.route} of {ins.src}, started"
    if isinstance(ins, Gather):
        return "gather", f"{ins.out} = {ins.route} of {ins.src} for gathering op {ins.group}"
    if isinstance(ins, Box):
        where = f" for {ins.comm.where}" if ins.comm is not None else ""
        return "box", f"{ins.out} = {ins.route or 'convert'} of {ins.src}{where}"
    if isinstance(ins, Launch):
        assert ins.comm is not None
        return "launch", f"{ins.out} = {ins.comm.route} of ({', '.join(ins.grads)}): {ins.comm.where}"
    if isinstance(ins, Wait):
        return "wait", f"{', '.join(ins.outs)} = wait {ins.handle}"
    if isinstance(ins, Release):
        if ins.unit is None:
            return "release", "backward over"
        grads = ", ".join(str(k) for k in ir.units[ins.unit].grads)
        what = f"bucket {ins.payload[0]}" if ins.bucket else ", ".join(ins.payload)
        return "release", f"unit {ins.unit} (gradients {grads}): {what}"
    if isinstance(ins, Return) and ins.outputs is not None:
        return "return", f"outputs [{', '.join(ins.outputs)}]"
    if isinstance(ins, Return):
        loss = f"loss {ins.loss}, " if ins.loss is not None else ""
        extra = f", input gradients [{', '.join(ins.input_grads)}]" if ins.input_grads else ""
        return "return", f"{loss}gradients [{', '.join(ins.grads)}]{extra}"
    return type(ins).__name__.lower(), ins.code()
