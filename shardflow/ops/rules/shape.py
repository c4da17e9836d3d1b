"""Shape ops: views, permutations, expand, squeeze/unsqueeze, split/cat/stack, slicing, ``new_*`` factories.

A split moves with its dim; ``P`` and ``B`` pass through (all of these are linear). Ops that take a shape
argument get a ``local`` function that passes the LOCAL shape of the chosen output layout instead.

``view``/``reshape`` map a split of input dim ``d`` to output dim ``e`` only where every shard of the input
is exactly the ``tensor_split`` shard of the output for every coordinate of the axis (``split_range``).
Per-axis rules cannot see nesting: ``(S(0), S(0))`` splits the pieces of axis 0 again on axis 1, and a
merge like ``(6, 5) -> (30,)`` that is exact for each axis alone is not exact for the nested pieces. The
local function checks the chosen nd-signature over the whole mesh and, where nesting breaks exactness,
falls back to gathering the input (collective, the same decision on every rank) and slicing the output.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch

from shardflow.ops.registry import (
    B,
    InnerBox,
    Inside,
    LocalContext,
    OpCall,
    P,
    PreparedFn,
    S,
    Sig,
    TensorMeta,
    inside,
    local,
    prepared,
    rule,
)
from shardflow.placement.sbp import Blocked, NdSbp, Placement
from shardflow.placement.shard import local_shape, shard_box, split_range

aten = torch.ops.aten


def _dim(d: int, ndim: int) -> int:
    """A possibly negative dim index of a tensor with ``ndim`` dims (0-d tensors accept 0 and -1)."""
    return d % max(ndim, 1)


def _arg(call: OpCall, i: int, name: str, default: Any) -> Any:
    if len(call.args) > i:
        return call.args[i]
    return call.kwargs.get(name, default)


def _local_out(ctx: LocalContext, i: int = 0) -> tuple[int, ...]:
    shape = ctx.out_shapes[i]
    assert shape is not None
    return local_shape(shape, ctx.outs[i], ctx.mesh.shape, ctx.coord)


def moved(n_in: int, in_ndim: int, dim_map: dict[int, int], n_out: int = 1) -> list[Sig]:
    """Signatures of an op whose ``n_in`` inputs share one layout: ``S(d) -> S(dim_map[d])`` for each
    mapped input dim, then ``P -> P`` and ``B -> B``."""
    sigs = [Sig((S(d),) * n_in, (S(e),) * n_out) for d, e in sorted(dim_map.items()) if d < in_ndim]
    return sigs + [Sig((P,) * n_in, (P,) * n_out), Sig((B,) * n_in, (B,) * n_out)]


# -- permutations -------------------------------------------------------------------------------------------


@rule(aten.t.default)
def _t(call: OpCall, k: int) -> list[Sig]:
    nd = call.tensors[0].ndim
    return moved(1, nd, {0: 1, 1: 0} if nd == 2 else {d: d for d in range(nd)})


@rule(aten.transpose.int)
def _transpose(call: OpCall, k: int) -> list[Sig]:
    nd = call.tensors[0].ndim
    a, b = _dim(call.args[1], nd), _dim(call.args[2], nd)
    perm = list(range(nd))
    if nd:
        perm[a], perm[b] = perm[b], perm[a]
    return moved(1, nd, {d: perm.index(d) for d in range(nd)})


@rule(aten.permute.default)
def _permute(call: OpCall, k: int) -> list[Sig]:
    nd = call.tensors[0].ndim
    dims = [_dim(d, nd) for d in call.args[1]]
    return moved(1, nd, {d: dims.index(d) for d in range(nd)})


# -- view / reshape -----------------------------------------------------------------------------------------


def infer_shape(numel: int, shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` with its ``-1`` (if any) resolved for ``numel`` elements."""
    shape = [int(n) for n in shape]
    if -1 in shape:
        i = shape.index(-1)
        rest = math.prod(n for j, n in enumerate(shape) if j != i)
        shape[i] = numel // rest if rest else 0
    return tuple(shape)


def _view_target(src: Sequence[int], dst: Sequence[int], d: int) -> list[tuple[int, int, int]]:
    """Output dims ``e`` whose elements line up with input dim ``d``: ``(e, num, den)`` with an output
    index along ``e`` equal to the input index along ``d`` times ``num / den`` (within one outer block)."""
    pre, inner = math.prod(src[:d]), math.prod(src[d + 1 :])
    out = []
    for e in range(len(dst)):
        if math.prod(dst[:e]) != pre:
            continue
        t = math.prod(dst[e + 1 :])
        if inner % t == 0:
            out.append((e, inner // t, 1))
        elif t % inner == 0:
            out.append((e, 1, t // inner))
    return out


def _maps(lo: int, hi: int, num: int, den: int) -> tuple[int, int] | None:
    if lo * num % den or hi * num % den:
        return None
    return lo * num // den, hi * num // den


def view_dim_map(src: Sequence[int], dst: Sequence[int], k: int) -> dict[int, tuple[int, int, int]]:
    """``{input dim: (output dim, num, den)}`` for the splits over ``k`` parts that ``view`` keeps exact."""
    if math.prod(src) == 0 or math.prod(src) != math.prod(dst):
        return {}
    found = {}
    for d in range(len(src)):
        for e, num, den in _view_target(src, dst, d):
            if all(_maps(*split_range(src[d], k, c), num, den) == split_range(dst[e], k, c) for c in range(k)):
                found[d] = (e, num, den)
                break
    return found


def _view_shapes(call: OpCall) -> tuple[tuple[int, ...], tuple[int, ...]]:
    src = call.tensors[0].shape
    return src, infer_shape(math.prod(src), call.args[1])


@rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(call: OpCall, k: int) -> list[Sig]:
    src, dst = _view_shapes(call)
    return moved(1, len(src), {d: e for d, (e, _, _) in view_dim_map(src, dst, k).items()})


def _nested_exact(ctx: LocalContext, src: Sequence[int], dst: Sequence[int]) -> bool:
    """Whether every coordinate's input box maps onto its output box under the chosen nd-signature."""
    return _exact_on(tuple(src), tuple(dst), tuple(ctx.ins[0]), tuple(ctx.outs[0]), tuple(ctx.mesh.shape))


@functools.lru_cache(maxsize=4096)  # asked twice per view lowered (its local function and its Inside), per plan
def _exact_on(src: tuple[int, ...], dst: tuple[int, ...], ins: NdSbp, outs: NdSbp, mesh_shape: tuple[int, ...]) -> bool:
    maps = {}
    for axis, (p, q) in enumerate(zip(ins, outs)):
        if isinstance(p, S) and isinstance(q, S):
            e, num, den = view_dim_map(src, dst, mesh_shape[axis])[p.dim]
            maps[p.dim] = (e, num, den)
    if not maps:
        return True
    # a Blocked dim keeps its size through the view (select.py lifts only such views): only S dims nest
    ins, outs = (tuple(B if isinstance(p, Blocked) else p for p in sbp) for sbp in (ins, outs))
    for coord in itertools.product(*(range(n) for n in mesh_shape)):
        ibox = shard_box(src, ins, mesh_shape, coord)
        obox = shard_box(dst, outs, mesh_shape, coord)
        for d, (e, num, den) in maps.items():
            if _maps(*ibox[d], num, den) != obox[e]:
                return False
    return True


def _regather(ctx: LocalContext, x: torch.Tensor, src: Sequence[int], dst: Sequence[int]) -> torch.Tensor:
    """Gather ``x`` (layout ``ctx.ins[0]``) to every rank, reshape it, and take this rank's output shard."""
    all_b: NdSbp = (B,) * ctx.mesh.ndim
    full = ctx.box(x, ctx.ins[0], tuple(src), all_b).reshape(tuple(dst))
    return ctx.box(full, all_b, tuple(dst), ctx.outs[0])


def _reshape_local(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    # a GlobalTensor reports contiguous strides whatever its local's are, so ``contiguous()`` on it is a
    # no-op and its local may be a transposed view: view where possible, else copy like reshape
    try:
        return aten.view.default(x, list(shape))
    except RuntimeError:
        return aten.reshape.default(x, list(shape))


@inside(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view_inside(ctx: LocalContext) -> Inside:
    src, dst = _view_shapes(ctx.call)
    if _nested_exact(ctx, src, dst):
        return Inside()
    all_b: NdSbp = (B,) * ctx.mesh.ndim  # ``_regather``: gathered whole, reshaped, this rank's piece taken
    return Inside((InnerBox(tuple(src), ctx.ins[0], all_b), InnerBox(tuple(dst), all_b, ctx.outs[0])), kernels=2)


@prepared(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view_local(ctx: LocalContext) -> PreparedFn:
    src, dst = _view_shapes(ctx.call)
    if not _nested_exact(ctx, src, dst):
        return lambda args, kwargs: _regather(ctx, args[0], src, dst)
    shape = _local_out(ctx)
    return lambda args, kwargs: _reshape_local(args[0], shape)


# -- expand, squeeze, unsqueeze -------------------------------------------------------------------------------


@rule(aten.expand.default)
def _expand(call: OpCall, k: int) -> list[Sig]:
    src = call.tensors[0].shape
    sizes = list(call.args[1])
    off = len(sizes) - len(src)
    keep = {d: d + off for d in range(len(src)) if sizes[d + off] in (-1, src[d])}
    return moved(1, len(src), keep)


@prepared(aten.expand.default)
def _expand_local(ctx: LocalContext) -> PreparedFn:
    shape = list(_local_out(ctx))
    return lambda args, kwargs: aten.expand.default(args[0], shape, *args[2:], **kwargs)


@rule(aten.unsqueeze.default)
def _unsqueeze(call: OpCall, k: int) -> list[Sig]:
    nd = call.tensors[0].ndim
    at = call.args[1] % (nd + 1)
    return moved(1, nd, {d: d if d < at else d + 1 for d in range(nd)})


def _squeezed(call: OpCall) -> list[int]:
    """Input dims that squeeze removes (only dims of global size 1)."""
    shape = call.tensors[0].shape
    nd = len(shape)
    if call.func == aten.squeeze.default:
        dims = list(range(nd))
    elif call.func == aten.squeeze.dim:
        dims = [_dim(call.args[1], nd)]
    else:
        dims = [_dim(d, nd) for d in call.args[1]]
    return sorted({d for d in dims if nd and shape[d] == 1})


@rule(aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(call: OpCall, k: int) -> list[Sig]:
    gone = _squeezed(call)
    nd = call.tensors[0].ndim
    return moved(1, nd, {d: d - sum(1 for g in gone if g < d) for d in range(nd) if d not in gone})


@local(aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims)
def _squeeze_local(ctx: LocalContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # a split may leave a local dim of size 1 (or 0) that is larger globally: squeeze the global ones only
    return aten.squeeze.dims(args[0], _squeezed(ctx.call))


# -- split, unbind, cat, stack ----------------------------------------------------------------------------


def _split_count(call: OpCall) -> int:
    if call.func == aten.split_with_sizes.default:
        return len(call.args[1])
    shape = call.tensors[0].shape
    nd = len(shape)
    n = shape[_dim(_arg(call, 2, "dim", 0), nd)] if nd else 1
    size = call.args[1]
    return max(1, -(-n // size)) if size else 1


def _equal_sections(call: OpCall, along: int) -> int:
    """How many equal sections ``split`` cuts dim ``along`` into (0 where they are not equal)."""
    n = call.tensors[0].shape[along]
    sizes = list(call.args[1]) if call.func == aten.split_with_sizes.default else None
    if sizes is None:
        size = call.args[1]
        sizes = [size] * (n // size) if size and n % size == 0 else []
    return len(sizes) if len(set(sizes)) == 1 else 0


@rule(aten.split.Tensor, aten.split_with_sizes.default)
def _split(call: OpCall, k: int) -> list[Sig]:
    """A ``Blocked`` input split into its blocks gives each block split plainly: q, k and v of a fused
    projection split by head."""
    nd = call.tensors[0].ndim
    along = _dim(_arg(call, 2, "dim", 0), nd)
    n_out = _split_count(call)
    sigs = moved(1, nd, {d: d for d in range(nd) if d != along}, n_out=n_out)
    if n_out >= 2 and _equal_sections(call, along) == n_out:
        sigs.insert(len(sigs) - 2, Sig((Blocked(along, n_out),), (S(along),) * n_out))
    return sigs


@prepared(aten.split.Tensor, aten.split_with_sizes.default)
def _split_local(ctx: LocalContext) -> PreparedFn:
    """Split a ``Blocked`` local into its blocks (the local's sections are its pieces, not the global
    sizes); any other layout splits a dim it does not split, so the op runs as written."""
    nd = ctx.call.tensors[0].ndim
    along = _dim(_arg(ctx.call, 2, "dim", 0), nd)
    if not any(isinstance(p, Blocked) and p.dim == along for p in ctx.ins[0]):
        return lambda args, kwargs: ctx.call.func(*args, **kwargs)
    pieces = [_local_out(ctx, i)[along] for i in range(len(ctx.outs))]  # equal; 0 where a block has no row here
    return lambda args, kwargs: aten.split_with_sizes.default(args[0], pieces, along)


@rule(aten.unbind.int)
def _unbind(call: OpCall, k: int) -> list[Sig]:
    shape = call.tensors[0].shape
    along = _dim(_arg(call, 1, "dim", 0), len(shape))
    n_out = shape[along]
    return moved(1, len(shape), {d: d - (d > along) for d in range(len(shape)) if d != along}, n_out=n_out)


@rule(aten.cat.default)
def _cat(call: OpCall, k: int) -> list[Sig]:
    # cat skips 1-d empty operands beside others of more dims (legacy; a key/value cache starts as one):
    # they stay B, the same empty tensor on every rank, and the others are laid out as if alone
    ndims = {t.ndim for t in call.tensors if t.shape != (0,)} or {1}
    nd = ndims.pop()
    if ndims:
        return [Sig((B,) * len(call.tensors), (B,))]
    skipped = [nd != 1 and t.shape == (0,) for t in call.tensors]
    rest = [t for t, s in zip(call.tensors, skipped) if not s]
    n = len(rest)
    along = _dim(_arg(call, 1, "dim", 0), nd)
    sigs = moved(n, nd, {d: d for d in range(nd) if d != along})
    if n >= 2 and nd and len({t.shape[along] for t in rest}) == 1:
        # blocks split alike, joined: each rank's pieces of them, in order (split's inverse)
        sigs.insert(len(sigs) - 2, Sig((S(along),) * n, (Blocked(along, n),)))
    return [_with_skipped(sig, skipped) for sig in sigs] if any(skipped) else sigs


def _with_skipped(sig: Sig, skipped: Sequence[bool]) -> Sig:
    """``sig`` (over the operands not skipped) with ``B`` for the skipped ones, in the operands' order."""
    ins = iter(sig.ins)
    return Sig(tuple(B if s else next(ins) for s in skipped), sig.outs)


@rule(aten.stack.default)
def _stack(call: OpCall, k: int) -> list[Sig]:
    n = len(call.tensors)
    nd = call.tensors[0].ndim
    at = _arg(call, 1, "dim", 0) % (nd + 1)
    return moved(n, nd, {d: d if d < at else d + 1 for d in range(nd)})


# -- slicing ----------------------------------------------------------------------------------------------


@rule(aten.slice.Tensor)
def _slice(call: OpCall, k: int) -> list[Sig]:
    nd = call.tensors[0].ndim
    along = _dim(_arg(call, 1, "dim", 0), nd)
    return moved(1, nd, {d: d for d in range(nd) if d != along})


@rule(aten.select.int)
def _select(call: OpCall, k: int) -> list[Sig]:
    nd = call.tensors[0].ndim
    along = _dim(call.args[1], nd)
    return moved(1, nd, {d: d - (d > along) for d in range(nd) if d != along})


@rule(aten.slice_backward.default)
def _slice_backward(call: OpCall, k: int) -> list[Sig]:
    nd = call.tensors[0].ndim
    along = _dim(call.args[2], nd)
    return moved(1, nd, {d: d for d in range(nd) if d != along})


@rule(aten.select_backward.default)
def _select_backward(call: OpCall, k: int) -> list[Sig]:
    nd = call.tensors[0].ndim  # the grad lacks the selected dim
    along = _dim(call.args[2], nd + 1)
    return moved(1, nd, {d: d if d < along else d + 1 for d in range(nd)})


@local(aten.slice_backward.default, aten.select_backward.default)
def _input_sizes_local(ctx: LocalContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return ctx.call.func(args[0], list(_local_out(ctx)), *args[2:], **kwargs)


# -- new_* factories --------------------------------------------------------------------------------------


NEW = [aten.new_empty_strided.default, aten.new_zeros.default, aten.new_empty.default, aten.new_ones.default,
       aten.new_full.default]  # fmt: skip


@rule(*NEW)
def _new(call: OpCall, k: int) -> list[Sig]:
    """The value does not depend on the input: a split output where the input is split the same way (same
    shape), else ``B`` from any input layout (so no boxing is ever needed)."""
    src: TensorMeta = call.tensors[0]
    size = tuple(int(n) for n in call.args[1])
    sigs = [Sig((S(d),), (S(d),)) for d in range(src.ndim) if size == src.shape]
    ins: list[Placement] = [S(d) for d in range(src.ndim)]
    return sigs + [Sig((p,), (B,)) for p in [*ins, P]] + [Sig((B,), (B,))]


def contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(int(n), 1)
    return strides[::-1]


@local(*NEW)
def _new_local(ctx: LocalContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    shape = list(_local_out(ctx))
    rest = list(args[2:])
    if ctx.call.func == aten.new_empty_strided.default:
        rest[0] = contiguous_strides(shape)
    return ctx.call.func(args[0], shape, *rest, **kwargs)
