"""The formula registry: ``OpFlops``, the convention's unit costs, and ``op_flops`` to look an op up."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

ADD = 1
DIV = 4
EXP = 8
SIGMOID = EXP + ADD + DIV  # 1 / (1 + exp(-x))


class OpFlops(NamedTuple):
    """One call's FLOPs: ``matmul`` (multiply-adds of matmuls, convolutions and attention products: what
    ``torch.utils.flop_counter`` counts), ``vector`` (everything else, by the module's convention) and
    ``recompute`` (hardware work redoing what the forward computed, as a fused attention backward does)."""

    matmul: int = 0
    vector: int = 0
    recompute: int = 0

    @property
    def total(self) -> int:
        """The op's model FLOPs (``recompute`` excluded)."""
        return self.matmul + self.vector


Formula = Callable[[Sequence[Any], dict[str, Any], Sequence[Any]], OpFlops]
FORMULAS: dict[str, Formula] = {}
FREE: set[str] = set()  # ops that only move or make data: 0 FLOPs, and known to be 0


def op_flops(func: Any, args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops | None:
    """FLOPs of ``func(*args, **kwargs)`` with results ``outs`` (tensors given as anything with a ``.shape``:
    global shapes give the logical op's work, one rank's local shapes that rank's); None when the op has no
    formula for it (or for the arguments it got). ``func`` is an ATen ``OpOverload`` (``aten.mm.default``) or
    its name."""
    if not isinstance(func, (str, torch._ops.OpOverload)):  # a higher-order op (cond, flex attention)
        return None
    name = func if isinstance(func, str) else func.overloadpacket.__name__
    if name.endswith("_") and (name[:-1] in FORMULAS or name[:-1] in FREE):  # in place: as its functional form
        name = name[:-1]
    if name in FREE:
        return OpFlops()
    formula = FORMULAS.get(name)
    if formula is None:
        return None
    try:
        return formula(args, kwargs, [o for o in outs if o is not None])
    except Exception:  # an overload the formula does not expect: counted as having none, never a failed compile
        return None


def numel(t: Any) -> int:
    return math.prod(t.shape) if t is not None and hasattr(t, "shape") else 0


def arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def formula(*names: str) -> Callable[[Formula], Formula]:
    """Register a formula for the ATen ops ``names`` (overload packet names, in-place ``_`` forms included)."""

    def register(fn: Formula) -> Formula:
        for name in names:
            FORMULAS[name] = fn
        return fn

    return register


def per_element(cost: int, *names: str) -> None:
    """``names`` cost ``cost`` FLOPs per element of their (first) result."""

    def count(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
        return OpFlops(vector=cost * numel(outs[0]) if outs else 0)

    for name in names:
        FORMULAS[name] = count
