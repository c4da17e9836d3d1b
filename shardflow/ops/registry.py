"""One registry of per-op layout rules, shared by eager GlobalTensor ops and the compiler (graph/lower.py).

A rule sees an op call with tensor metadata (global shape, dtype) in place of tensors and the size of one
mesh axis, and lists the 1-d signatures valid on that axis: the placement each tensor input must have and
the placement of each tensor output. nd-SBP signatures are products of per-axis ones (OneFlow's way);
the selector prices each by the boxing it needs. Rules list their preferred signature first, and every
rule ends with the all-``B`` one, so any op can always run. Ops whose shard computation is not the op
itself on the shards (shape arguments, a mean over a split dim, a loss averaged over the global batch)
register a ``local`` function as well.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, NdSbp, P, Placement, S


@dataclass(frozen=True)
class TensorMeta:
    """What a rule knows about a tensor argument: its global shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class OpCall:
    """An ATen call with ``TensorMeta`` in place of each GlobalTensor argument (in flatten order)."""

    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    tensors: tuple[TensorMeta, ...] = ()


@dataclass(frozen=True)
class Sig:
    """A 1-d signature: one placement per tensor input, one per tensor output."""

    ins: tuple[Placement, ...]
    outs: tuple[Placement, ...]


Boxer = Callable[[torch.Tensor, NdSbp, tuple[int, ...], NdSbp], torch.Tensor]


@dataclass(frozen=True)
class LocalContext:
    """What a ``local`` function needs to compute this rank's shard of the outputs.

    ``box(local, src_sbp, global_shape, dst_sbp)`` converts a local on this mesh (e.g. a partial count to
    its sum); the executor provides it, so rules stay above the layers that run collectives.
    """

    call: OpCall
    mesh: Mesh
    coord: tuple[int, ...]
    ins: tuple[NdSbp, ...]
    outs: tuple[NdSbp, ...]
    out_shapes: tuple[tuple[int, ...] | None, ...]
    box: Boxer


RuleFn = Callable[[OpCall, int], list[Sig]]
LocalFn = Callable[[LocalContext, tuple[Any, ...], dict[str, Any]], Any]

PreparedFn = Callable[[tuple[Any, ...], dict[str, Any]], Any]

RULES: dict[Any, RuleFn] = {}
LOCALS: dict[Any, LocalFn] = {}
PREPARED: dict[Any, Callable[[LocalContext], PreparedFn]] = {}
# bytes a ``local`` function holds for a moment beyond its outputs (its own temporaries), for memory plans
WORKSPACE: dict[Any, Callable[[LocalContext], int]] = {}


@dataclass(frozen=True)
class InnerBox:
    """A conversion a ``local`` function makes through ``ctx.box``: a tensor of global ``shape`` (the op's
    first input's dtype) from layout ``src`` to ``dst``."""

    shape: tuple[int, ...]
    src: NdSbp
    dst: NdSbp


@dataclass(frozen=True)
class Inside:
    """What a ``local`` function runs beyond one kernel of its op, for the cost model: its conversions
    (collectives the program cannot see), how many kernels it launches, and how many passes over its first
    input's local bytes they make (0: as many as the op itself)."""

    boxes: tuple[InnerBox, ...] = ()
    kernels: int = 1
    passes: int = 0


INSIDE: dict[Any, Callable[[LocalContext], Inside]] = {}


def rule(*ops: Any) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn(call, axis_size) -> [Sig, ...]`` as the layout rule of each ATen overload in ``ops``."""

    def deco(fn: RuleFn) -> RuleFn:
        for op in ops:
            RULES[op] = fn
        return fn

    return deco


def local(*ops: Any) -> Callable[[LocalFn], LocalFn]:
    """Register how to compute the local outputs of ``ops`` when it is not the op applied to the shards."""

    def deco(fn: LocalFn) -> LocalFn:
        for op in ops:
            LOCALS[op] = fn
        return fn

    return deco


def workspace(*ops: Any) -> Callable[[Callable[[LocalContext], int]], Callable[[LocalContext], int]]:
    """Register ``fn(ctx) -> bytes`` the ``local`` function of ``ops`` allocates and frees inside one call
    (the memory plan adds them where the op runs; the op's outputs are counted anyway)."""

    def deco(fn: Callable[[LocalContext], int]) -> Callable[[LocalContext], int]:
        for op in ops:
            WORKSPACE[op] = fn
        return fn

    return deco


def inside(*ops: Any) -> Callable[[Callable[[LocalContext], Inside]], Callable[[LocalContext], Inside]]:
    """Register ``fn(ctx) -> Inside``: what the ``local`` function of ``ops`` runs in this context (the
    cost model prices its collectives and kernels; the program shows one line for it)."""

    def deco(fn: Callable[[LocalContext], Inside]) -> Callable[[LocalContext], Inside]:
        for op in ops:
            INSIDE[op] = fn
        return fn

    return deco


@functools.cache
def writes_any(func: Any) -> bool:
    """Whether ``func`` writes any of its arguments in place (by position or by keyword)."""
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


@functools.cache
def writes_arg(func: Any, index: int) -> bool:
    """Whether ``func`` writes its argument ``index`` in place (``add_``'s self, batch norm's running stats)."""
    args = func._schema.arguments
    info = args[index].alias_info if index < len(args) else None
    return bool(info is not None and info.is_write)


def prepared(*ops: Any) -> Callable[[Callable[[LocalContext], PreparedFn]], Callable[[LocalContext], PreparedFn]]:
    """Register ``fn(ctx) -> run(args, kwargs)``: the work of a ``local`` function that depends only on its
    context (local shapes, whether a view stays exact), done once when a program is lowered. Registers the
    ``local`` function of ``ops`` too (eager calls ``fn(ctx)(args, kwargs)`` every time)."""

    def deco(fn: Callable[[LocalContext], PreparedFn]) -> Callable[[LocalContext], PreparedFn]:
        def eager(ctx: LocalContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return fn(ctx)(args, kwargs)

        for op in ops:
            PREPARED[op] = fn
            LOCALS[op] = eager
        return fn

    return deco


def all_b(call: OpCall, n_out: int = 1) -> Sig:
    """The signature every op has: everything broadcast."""
    return Sig((B,) * len(call.tensors), (B,) * n_out)


def same(p: Placement, n_in: int, n_out: int = 1) -> Sig:
    return Sig((p,) * n_in, (p,) * n_out)


__all__ = [
    "B",
    "P",
    "S",
    "LOCALS",
    "PREPARED",
    "RULES",
    "LocalContext",
    "OpCall",
    "Sig",
    "WORKSPACE",
    "TensorMeta",
    "all_b",
    "local",
    "prepared",
    "rule",
    "same",
    "workspace",
    "writes_arg",
]
