"""``StepIR``: one rank's step program as instructions plus the facts passes need about its variables.

A variable (``v1``, ``v2``, ...) holds storages: ``refs`` names them, ``storages`` gives each one's bytes
on this rank and what made it; ``param_alias`` says which parameters a variable may share storage with
(views, boxed copies), so an update waits for its last use. Constants (ops, bound boxing plans, local
contexts, tensors the trace holds as attributes) are named ``_<hint><n>`` and handed to the generated code
as globals; an instruction may read one where it reads a variable (``uses``), and nothing deletes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shardflow.graph.ir.instr import Instr, Release, Unpack

if TYPE_CHECKING:
    from shardflow.boxing.plan import Plan
    from shardflow.ops import TensorMeta
    from shardflow.placement.sbp import NdSbp


@dataclass(frozen=True)
class Storage:
    """One buffer of the program on this rank."""

    nbytes: int
    label: str


@dataclass(frozen=True)
class Value:
    """A tensor value of the graph on this rank: its layout and global metadata."""

    sbp: NdSbp
    meta: TensorMeta


@dataclass(frozen=True)
class Gradient:
    """A gradient output as the layout pass leaves it (to the bucket pass): index ``k``, its variable and
    layout, and the layout it is returned in."""

    k: int
    var: str
    sbp: NdSbp
    meta: TensorMeta
    want: NdSbp


@dataclass(frozen=True)
class Conversion:
    """A gradient the bucket pass leaves for after backward: converted by its boxing ``plan``."""

    k: int
    var: str
    plan: Plan


@dataclass(frozen=True)
class Waiting:
    """A launched bucket (from the bucket pass to release points and waits): its handle, its gradients."""

    handle: str
    grads: tuple[int, ...]


@dataclass(frozen=True)
class Unit:
    """Gradients handed to the update together: a bucket (as its collective's handle) or a group needing none."""

    grads: tuple[int, ...]  # gradient output indices
    bucket: bool


@dataclass
class StepIR:
    """See the module docstring. ``releases[i]``: the update units handed on right after instruction ``i``
    (set by the release pass, the last to insert instructions before placement: they compute nothing, so
    they take no line of the memory timeline). The end of backward is an instruction of its own
    (``Release(unit=None)``): the waits for communication come after it."""

    body: list[Instr] = field(default_factory=list)
    consts: dict[str, Any] = field(default_factory=dict)
    storages: dict[str, Storage] = field(default_factory=dict)
    refs: dict[str, list[str]] = field(default_factory=dict)
    param_alias: dict[str, frozenset[int]] = field(default_factory=dict)
    variables: set[str] = field(default_factory=set)
    releases: dict[int, list[Release]] = field(default_factory=dict)
    units: list[Unit] = field(default_factory=list)
    release_lines: list[int] = field(default_factory=list)  # per unit: the instruction it follows
    placed: dict[str, int] = field(default_factory=dict)  # storage key -> arena block, once placed
    stage_outputs: tuple[str, ...] = ()  # a stage: its forward's results, returned where its forward ends

    def new_var(self) -> str:
        name = f"v{len(self.variables) + 1}"
        self.variables.add(name)
        return name

    def const(self, value: Any, hint: str) -> str:
        name = f"_{hint}{len(self.consts)}"
        self.consts[name] = value
        return name

    def emit(self, instr: Instr) -> int:
        self.body.append(instr)
        return len(self.body) - 1

    def store(self, var: str, nbytes: int, label: str) -> None:
        """``var`` holds a new storage of ``nbytes`` on this rank."""
        self.storages[var] = Storage(nbytes, label)
        self.refs[var] = [var]

    def alias(self, name: str, like: str, refs: list[str] | None = None) -> None:
        """``name`` holds what ``like`` holds (a view, an element), or ``refs`` where given."""
        self.refs[name] = list(self.refs.get(like, [])) if refs is None else refs
        if like in self.param_alias:
            self.param_alias[name] = self.param_alias[like]

    def move_storage(self, key: str, into: str) -> None:
        """Storage ``key`` is ``into``'s after all: every variable holding it holds ``into``'s instead."""
        del self.storages[key]
        for var, keys in self.refs.items():
            if key in keys:
                self.refs[var] = list(dict.fromkeys(into if k == key else k for k in keys))

    def split_at(self) -> int | None:
        """A stage: the instruction where its backward starts (the arriving gradients bound), else None."""
        return next(
            (i for i, ins in enumerate(self.body) if isinstance(ins, Unpack) and ins.source == "grads_in"), None
        )

    def merged(self) -> list[tuple[Instr, int | None]]:
        """The instructions with the releases in place: (instruction, its index in ``body``, None for a release)."""
        out: list[tuple[Instr, int | None]] = []
        for i, ins in enumerate(self.body):
            out.append((ins, i))
            out += [(r, None) for r in self.releases.get(i, [])]
        return out
