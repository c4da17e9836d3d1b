"""Release points: where each update unit may be handed to the update actors during backward.

A unit is a gradient bucket (handed on as its collective's handle) or the gradients needing no
communication that become final on one instruction. It is released after the later of the instruction
making it and the last instruction reading any of its parameters (or a view or copy of them): from there
on an actor may update those parameters in place while the rest of backward runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shardflow.graph.ir.instr import Release
from shardflow.graph.ir.step import StepIR, Unit, Waiting


def release_units(ir: StepIR, waits: Sequence[Waiting], grad_vars: Mapping[int, str], grad_of: Sequence[int]) -> None:
    """Fill ``ir.units``, ``ir.release_lines`` and ``ir.releases``, in release order."""
    last_param: dict[int, int] = {}
    made: dict[str, int] = {}
    for i, ins in enumerate(ir.body):
        for name in ins.defs:
            made.setdefault(name, i)
        for name in [*ins.uses, *ins.defs]:
            for param in ir.param_alias.get(name, ()):
                last_param[param] = i

    def after(var: str, ks: Sequence[int]) -> int:
        return max([made[var], *(last_param.get(grad_of[k], 0) for k in ks)])

    entries: list[tuple[int, tuple[int, ...], tuple[str, ...], bool]] = []
    for w in waits:
        entries.append((after(w.handle, w.grads), w.grads, (w.handle,), True))
    in_buckets = {k for w in waits for k in w.grads}
    direct: dict[int, list[int]] = {}  # release instruction -> gradients needing no communication
    for k in range(len(grad_of)):
        if k not in in_buckets:
            direct.setdefault(after(grad_vars[k], [k]), []).append(k)
    for line, group in direct.items():
        entries.append((line, tuple(group), tuple(grad_vars[k] for k in group), False))
    for line, grads, payload, bucket in sorted(entries, key=lambda e: e[0]):
        ir.releases.setdefault(line, []).append(Release(unit=len(ir.units), payload=payload, bucket=bucket))
        ir.units.append(Unit(grads, bucket))
        ir.release_lines.append(line)
