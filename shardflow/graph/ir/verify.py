"""The IR's invariants, checked after every pass (as ``torch.fx``'s ``Graph.lint``): a pass that leaves a
fact stale fails here, naming the pass, instead of as a wrong memory figure or a NameError in generated code.

- every variable is defined once, and every use of a variable (not a constant) comes after its definition;
- every storage a variable holds (``refs``) exists in ``storages``;
- releases follow instructions of the body, units and their release lines agree, and a stage has one cut.
"""

from __future__ import annotations

from shardflow.graph.ir.instr import Unpack
from shardflow.graph.ir.step import StepIR


class IRError(AssertionError):
    """A pass left the IR inconsistent: a compiler bug, not a user error."""


def verify(ir: StepIR, after: str) -> None:
    """Raise ``IRError`` naming pass ``after`` if ``ir`` breaks an invariant of the module docstring."""
    problems: list[str] = []
    defined: set[str] = set()
    for i, ins in enumerate(ir.body):
        for name in ins.uses:
            if name not in defined and name not in ir.consts:  # a constant (a traced buffer) is a global
                problems.append(f"instruction {i} ({ins.code()}) uses {name} before it is defined")
        for name in ins.defs:
            if name in defined:
                problems.append(f"instruction {i} ({ins.code()}) defines {name} again")
            defined.add(name)
    for var, keys in ir.refs.items():
        missing = [k for k in keys if k not in ir.storages]
        if missing:
            problems.append(f"{var} holds storages {missing} that do not exist")
    for line, releases in ir.releases.items():
        if not 0 <= line < len(ir.body):
            problems.append(f"releases after instruction {line} of {len(ir.body)}")
        for r in releases:
            if r.unit is None or r.unit >= len(ir.units) or ir.release_lines[r.unit] != line:
                problems.append(f"release of unit {r.unit} after instruction {line} disagrees with the units")
    cuts = [i for i, ins in enumerate(ir.body) if isinstance(ins, Unpack) and ins.source == "grads_in"]
    if len(cuts) > 1:
        problems.append(f"{len(cuts)} cuts (instructions {cuts}); a stage has one")
    if problems:
        shown = "\n  ".join(problems[:10])
        raise IRError(f"the IR is inconsistent after {after}:\n  {shown}")
