"""Reductions: over a split dim the shard results are partial sums (``S -> P``), elsewhere the split
moves to its new index. A mean over a split dim divides the shard's sum by the global count."""

from __future__ import annotations

import math
from typing import Any

import torch

from shardflow.ops.registry import B, InnerBox, Inside, LocalContext, OpCall, P, S, Sig, inside, local, rule
from shardflow.placement.sbp import NdSbp, is_split

aten = torch.ops.aten


def _dims(call: OpCall) -> tuple[list[int], bool]:
    nd = call.tensors[0].ndim
    dims = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim")
    keep = bool(call.args[2] if len(call.args) > 2 else call.kwargs.get("keepdim", False))
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(nd)), keep
    if isinstance(dims, int):
        dims = [dims]
    return sorted(d % max(nd, 1) for d in dims), keep


def reduce_sigs(call: OpCall) -> list[Sig]:
    nd = call.tensors[0].ndim
    dims, keep = _dims(call)
    sigs = []
    for d in range(nd):
        if d in dims:
            sigs.append(Sig((S(d),), (P,)))
        else:
            sigs.append(Sig((S(d),), (S(d if keep else d - sum(1 for r in dims if r < d)),)))
    return sigs + [Sig((P,), (P,)), Sig((B,), (B,))]


@rule(aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim)
def _sum(call: OpCall, k: int) -> list[Sig]:
    return reduce_sigs(call)


@local(aten.mean.default, aten.mean.dim)
def _mean_local(ctx: LocalContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Where a reduced dim is split, sum the shard and divide by the global number of elements reduced."""
    dims, _ = _dims(ctx.call)
    split = {p.dim for p in ctx.ins[0] if is_split(p)}  # type: ignore[union-attr]
    if not split & set(dims):
        return ctx.call.func(*args, **kwargs)
    x = args[0]
    count = math.prod(ctx.call.tensors[0].shape[d] for d in dims)
    rest = list(args[1:])
    out = aten.sum.dim_IntList(x, dims, *rest[1:], **kwargs) if rest or kwargs else aten.sum.default(x)
    return out / count


@rule(aten.linalg_vector_norm.default)
def _norm(call: OpCall, k: int) -> list[Sig]:
    """A whole-tensor p-norm of a split tensor: shards' ``|x|^p`` sums are partial, summed by boxing."""
    ord_ = call.args[1] if len(call.args) > 1 else call.kwargs.get("ord", 2)
    dim = call.args[2] if len(call.args) > 2 else call.kwargs.get("dim")
    if dim is None and isinstance(ord_, (int, float)) and 0 < ord_ < math.inf:
        return [Sig((S(d),), (B,)) for d in range(call.tensors[0].ndim)] + [Sig((B,), (B,))]
    return [Sig((B,), (B,))]


@inside(aten.linalg_vector_norm.default)
def _norm_inside(ctx: LocalContext) -> Inside:
    partial = _norm_partial(ctx.ins[0])
    if partial is None:
        return Inside()
    return Inside((InnerBox((), partial, (B,) * ctx.mesh.ndim),), kernels=3)  # the norm, its power, the root


def _norm_partial(sbp: NdSbp) -> NdSbp | None:
    """The layout of a split tensor's powered norm (partial where it is split), or None when it is whole."""
    if all(p == B for p in sbp):
        return None
    return tuple(P if is_split(p) else p for p in sbp)


@local(aten.linalg_vector_norm.default)
def _norm_local(ctx: LocalContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    partial = _norm_partial(ctx.ins[0])
    if partial is None:
        return ctx.call.func(*args, **kwargs)
    ord_ = float(args[1] if len(args) > 1 else kwargs.get("ord", 2))
    powered = ctx.call.func(*args, **kwargs) ** ord_
    total = ctx.box(powered, partial, (), (B,) * ctx.mesh.ndim)
    return total ** (1.0 / ord_)


@rule(aten.argmax.default, aten.argmin.default, aten.amax.default, aten.amin.default)
def _extremum(call: OpCall, k: int) -> list[Sig]:
    """Arg/max/min over dims that are whole on each rank: a shard's extremum is not a partial of the
    global one, so a split reduced dim is gathered first (argmax with no dim reads the whole tensor)."""
    nd = call.tensors[0].ndim
    dims, keep = _dims(call)
    if call.func in (aten.argmax.default, aten.argmin.default) and (len(call.args) < 2 or call.args[1] is None):
        if call.kwargs.get("dim") is None:
            return [Sig((B,), (B,))]
    kept = [d for d in range(nd) if d not in dims]
    return [Sig((S(d),), (S(d if keep else d - sum(1 for r in dims if r < d)),)) for d in kept] + [Sig((B,), (B,))]


@rule(aten.cumsum.default, aten.flip.default)
def _along(call: OpCall, k: int) -> list[Sig]:
    """A running sum (or a reversal) along dims that are whole on each rank; splits elsewhere pass through.
    Both are linear, so partial sums stay partial (HF's masks take a cumsum of position ids; cumsum's
    gradient is a flipped cumsum)."""
    nd = call.tensors[0].ndim
    along = call.args[1]
    dims = {d % max(nd, 1) for d in (along if isinstance(along, (list, tuple)) else [along])}
    return [Sig((S(d),), (S(d),)) for d in range(nd) if d not in dims] + [Sig((P,), (P,)), Sig((B,), (B,))]
