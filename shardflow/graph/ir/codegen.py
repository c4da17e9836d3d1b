"""Code generation: the program's instructions as one Python function (a stage: two), ``exec``-ed once.

Each instruction is one line, each variable deleted after its last use, so a step costs its ATen calls
and collectives, not dispatch. The checked variant, run once first, asserts every op's local shape and
that placed ops wrote into their arena blocks.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shardflow.comm.buckets import wait_bucket
from shardflow.graph.arena import Arena, check_outside, check_placed
from shardflow.graph.ir.instr import Instr, Op
from shardflow.graph.ir.liveness import saved
from shardflow.graph.ir.step import StepIR


def _check(value: torch.Tensor, want: tuple[int, ...], what: str) -> None:
    if tuple(value.shape) != want:
        raise AssertionError(f"layout rule bug: {what} gave a local of shape {tuple(value.shape)}, expected {want}")


def _skip(unit: int | None, payload: Any) -> None:
    """``ready`` when nobody listens: the program then returns every gradient after its waits."""


def checks(ins: Instr, arena: bool) -> str | None:
    """The checked program's assertions after ``ins``, or None."""
    if not isinstance(ins, Op):
        return None
    out = [f"_check({ins.out if i is None else f'{ins.out}[{i}]'}, {shape!r}, {ins.op!r})" for i, shape in ins.checks]
    if ins.blocks:
        blocks = ", ".join(f"_A[{b}]" for b in ins.blocks)
        target = blocks if len(ins.blocks) == 1 else f"({blocks},)"
        out.append(f"_placed({ins.out}, {target}, {ins.op!r})")
    if arena and ins.local_new:
        out.append(f"_outside({ins.out}, _arena, {ins.op!r})")
    return "; ".join(out) if out else None


@dataclass(frozen=True)
class _Line:
    """A line of generated code, the variables it defines and uses, and its checked-mode assertions."""

    code: str
    defs: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    check: str | None = None


def _function(head: str, lines: Sequence[_Line], variables: Collection[str], prologue: Sequence[str] = ()) -> str:
    """One generated function: its lines, each variable deleted after its last use (constants, which an
    instruction may read as it reads a variable, are globals: never deleted)."""
    last: dict[str, int] = {}
    for i, line in enumerate(lines):
        for name in [*line.defs, *line.uses]:
            last[name] = i
    out = [head, *("    " + p for p in prologue)]
    for i, line in enumerate(lines):
        out.append("    " + line.code)
        if line.check:
            out.append("    " + line.check)
        dead = sorted({n for n in [*line.defs, *line.uses] if last[n] == i and n in variables})
        if dead and not line.code.startswith("return"):
            out.append(f"    del {', '.join(dead)}")
    return "\n".join(out) + "\n"


def source(ir: StepIR, arena: Arena | None, checked: bool) -> str:
    """The program's code: ``step(args, ready)``; a stage's ``step`` (its forward) and ``backward``."""
    lines: list[_Line] = []
    split = ir.split_at()
    k = 0
    for ins, i in ir.merged():
        if i == split:
            k = len(lines)
        check = checks(ins, arena is not None) if checked else None
        lines.append(_Line(ins.code(), ins.defs, ins.uses, check))
    fill = ["if not _A: _fill(args)"] if arena is not None else []
    if split is None:
        return _function("def step(args, ready=_skip):", lines, ir.variables, fill)
    # a stage: the forward returns its outputs and what the backward needs, which takes them back
    kept = tuple(saved(ir))
    keep = f"({', '.join(kept)}{',' if len(kept) == 1 else ''})"
    outs = _Line(f"return [{', '.join(ir.stage_outputs)}], {keep}", uses=(*ir.stage_outputs, *kept))
    forward = [*lines[:k], outs]
    backward = [_Line(f"{keep} = saved", defs=kept), *lines[k:]]
    return _function("def step(args, ready=_skip):", forward, ir.variables, fill) + _function(
        "def backward(saved, grads_in, ready=_skip):",
        backward,
        ir.variables,
        [f.replace("args", "grads_in") for f in fill],
    )


@dataclass(frozen=True)
class Built:
    """The fast source, and the namespaces holding the fast and the checked functions (``step``, ``backward``)."""

    source: str
    fast: dict[str, Any]
    checked: dict[str, Any]


def build(ir: StepIR, arena: Arena | None) -> Built:
    """Generate, ``exec`` and return both variants of the program."""
    fast, checked = source(ir, arena, False), source(ir, arena, True)
    env = {"_wait": wait_bucket, "_check": _check, "_skip": _skip, "_placed": check_placed, **ir.consts}
    if arena is not None:
        env |= {"_A": arena.views, "_fill": arena.fill, "_arena": arena, "_outside": check_outside}
    fast_env, checked_env = dict(env), dict(env)
    exec(compile(fast, "<shardflow step>", "exec"), fast_env)  # noqa: S102 - our own generated code
    exec(compile(checked, "<shardflow checked step>", "exec"), checked_env)  # noqa: S102
    return Built(fast, fast_env, checked_env)
