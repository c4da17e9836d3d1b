"""Plan entries as attributes of a compiled module: ``pm.bucket_bytes = 1`` re-plans, never a silent no-op.

Programs are lowered from the plan once; an option changed afterwards must reach them. A ``Knob`` reads its
entry from ``owner.plan`` and setting it calls ``owner.replan(entry=value)``, which checks the new plan,
logs the change and drops what was built from the old one. A ``Fixed`` entry (layouts, the ZeRO axis) is
baked into the module's tensors: setting it raises, naming the way to another plan.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from shardflow.plan.record import Execution

log = logging.getLogger("shardflow.plan")
_EXECUTION = {f.name for f in dataclasses.fields(Execution)}


class Knob:
    """An entry of ``owner.plan`` (or of its ``execution``) that can change after compiling by re-planning."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, cls: type | None = None) -> Any:
        if obj is None:
            return self
        source = obj.plan.execution if self.name in _EXECUTION else obj.plan
        return getattr(source, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.replan(**{self.name: value})


class Fixed:
    """A derived entry fixed when the module was built: reading works, setting raises."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, cls: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__[f"_{self.name}"]

    def __set__(self, obj: Any, value: Any) -> None:
        if f"_{self.name}" not in obj.__dict__:  # the module's own constructor
            obj.__dict__[f"_{self.name}"] = value
            return
        raise AttributeError(
            f"pm.{self.name} is fixed by the plan the module was built from ({self.what}); compile another "
            f"plan instead: sf.compile(model, plan=pm.plan.replace(...), ...) or sf.compile(..., new arguments)"
        )


def logged(before: Any, after: Any) -> None:
    """Log what a re-plan changed (field by field), so a changed option is never silent."""
    changes = []
    for f in dataclasses.fields(before):
        a, b = getattr(before, f.name), getattr(after, f.name)
        if a != b and dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is type(b):
            changes += [f"{g.name}: {getattr(a, g.name)!r} -> {getattr(b, g.name)!r}" for g in dataclasses.fields(a)
                        if getattr(a, g.name) != getattr(b, g.name)]  # fmt: skip
        elif a != b:
            changes.append(f"{f.name}: {a!r} -> {b!r}")
    if changes:
        log.info("re-planned (%s); programs are built anew at the next step", "; ".join(changes))


class Unsupported(Knob):
    """An entry this kind of module cannot change (it reads as the plan says; setting it raises)."""

    def __init__(self, why: str) -> None:
        self.why = why

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"pm.{self.name} cannot change here: {self.why}")
