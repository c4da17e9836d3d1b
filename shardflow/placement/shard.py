"""Which box of the global tensor a mesh coordinate holds under an nd-SBP.

Splits follow ``torch.tensor_split``: of ``n`` rows over ``k`` parts, the first ``n % k`` parts get one
more. Splits of one dim on several axes nest in axis order: axis 0 splits first, then axis 1 splits each
piece. A shard is therefore always one contiguous box, which the boxing planner intersects, except under a
``Blocked(dim, k)`` layout: that is ``S(dim + 1)`` of the tensor with ``dim`` unflattened to ``(k, n // k)``
(``unflatten``), one box there and ``k`` boxes of the tensor itself (``shard_boxes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from shardflow.placement.sbp import Blocked, NdSbp, Placement, S, format_sbp

Box = tuple[tuple[int, int], ...]


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``n`` items are split into ``parts`` like tensor_split."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def blocked_of(sbp: NdSbp) -> Blocked | None:
    """The ``Blocked`` placement of ``sbp`` (None without one)."""
    return next((p for p in sbp if isinstance(p, Blocked)), None)


def has_shards(sbp: NdSbp) -> bool:
    """False where axes split one dim in ways that do not combine: plainly and in blocks, or in blocks
    of different counts (a product of per-axis signatures can propose such a layout)."""
    blocked = {p for p in sbp if isinstance(p, Blocked)}
    if not blocked:
        return True
    dims = {p.dim for p in blocked}
    return len(blocked) == 1 and not any(isinstance(p, S) and p.dim in dims for p in sbp)


def unflatten(global_shape: Sequence[int], sbp: NdSbp) -> tuple[tuple[int, ...], NdSbp] | None:
    """``(shape, sbp)`` with the blocked dim unflattened to ``(k, n // k)`` and every ``Blocked`` turned
    into the plain split it is there; None where another axis splits that dim plainly (``S(dim)``), which
    has no such view. Raises for a dim that ``k`` does not divide."""
    bl = blocked_of(sbp)
    if bl is None:
        return tuple(int(n) for n in global_shape), sbp
    d, k = bl.dim, bl.blocks
    if d >= len(global_shape) or global_shape[d] % k:
        raise ValueError(
            f"layout {format_sbp(sbp)} does not fit shape {tuple(global_shape)}: Blocked({d}, {k}) needs dim {d} "
            f"to exist and divide into {k} equal blocks"
        )
    out: list[Placement] = []
    for p in sbp:
        if isinstance(p, Blocked):
            if p != bl:
                return None
            out.append(S(d + 1))
        elif isinstance(p, S):
            if p.dim == d:
                return None
            out.append(S(p.dim + 1) if p.dim > d else p)
        else:
            out.append(p)
    shape = tuple(int(n) for n in global_shape)
    return shape[:d] + (k, shape[d] // k) + shape[d + 1 :], tuple(out)


def view_of(global_shape: Sequence[int], sbp: NdSbp) -> tuple[tuple[int, ...], NdSbp]:
    """``unflatten``, raising for a layout that has no shards."""
    view = unflatten(global_shape, sbp)
    if view is None:
        raise ValueError(f"layout {format_sbp(sbp)} splits one dim both plainly and in blocks; it has no shards")
    return view


def shard_boxes(global_shape: Sequence[int], sbp: NdSbp, mesh_shape: Sequence[int], coord: Sequence[int]) -> list[Box]:
    """The boxes held at ``coord`` in the order the local holds them: one box, or one per block under
    ``Blocked`` (the local is their concatenation along the blocked dim)."""
    bl = blocked_of(sbp)
    if bl is None:
        return [shard_box(global_shape, sbp, mesh_shape, coord)]
    shape, plain = view_of(global_shape, sbp)
    box, d, m = shard_box(shape, plain, mesh_shape, coord), bl.dim, shape[bl.dim + 1]
    (b0, b1), (lo, hi) = box[d], box[d + 1]
    return [box[:d] + ((i * m + lo, i * m + hi),) + box[d + 2 :] for i in range(b0, b1)]


def shard_box(global_shape: Sequence[int], sbp: NdSbp, mesh_shape: Sequence[int], coord: Sequence[int]) -> Box:
    """The box (per dim ``[start, stop)``) held at mesh coordinate ``coord``; ``P`` and ``B`` keep the piece.
    A ``Blocked`` layout holds several boxes: ``shard_boxes``."""
    if blocked_of(sbp) is not None:
        raise ValueError(f"a {format_sbp(sbp)} shard is several boxes, not one: use shard_boxes")
    box = [(0, int(n)) for n in global_shape]
    for axis, p in enumerate(sbp):
        if isinstance(p, S):
            lo, hi = box[p.dim]
            a, b = split_range(hi - lo, mesh_shape[axis], coord[axis])
            box[p.dim] = (lo + a, lo + b)
    return tuple(box)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


def intersect(a: Box, b: Box) -> Box | None:
    """The common box of ``a`` and ``b``, or None when they share no element (empty boxes share none)."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    if any(lo >= hi for lo, hi in out):
        return None
    return out


def relative(box: Box, origin: Box) -> tuple[slice, ...]:
    """Slices that select ``box`` inside a local tensor that holds ``origin``."""
    return tuple(slice(lo - o, hi - o) for (lo, hi), (o, _) in zip(box, origin))


def local_shape(
    global_shape: Sequence[int], sbp: NdSbp, mesh_shape: Sequence[int], coord: Sequence[int]
) -> tuple[int, ...]:
    bl = blocked_of(sbp)
    if bl is None:
        return box_shape(shard_box(global_shape, sbp, mesh_shape, coord))
    shape, plain = view_of(global_shape, sbp)
    out = box_shape(shard_box(shape, plain, mesh_shape, coord))
    return out[: bl.dim] + (out[bl.dim] * out[bl.dim + 1],) + out[bl.dim + 2 :]


def max_local_shape(global_shape: Sequence[int], sbp: NdSbp, mesh_shape: Sequence[int]) -> tuple[int, ...]:
    """The largest local shape over the mesh: the first coordinate of every axis is never smaller."""
    return local_shape(global_shape, sbp, mesh_shape, [0] * len(mesh_shape))


def local_pieces(
    global_shape: Sequence[int], sbp: NdSbp, mesh_shape: Sequence[int], coord: Sequence[int]
) -> list[tuple[Box, tuple[slice, ...]]]:
    """``(box of the global tensor, where it lies in the local)`` for each box held at ``coord``."""
    boxes = shard_boxes(global_shape, sbp, mesh_shape, coord)
    bl = blocked_of(sbp)
    if bl is None:
        return [(boxes[0], tuple(slice(None) for _ in global_shape))]
    out, at = [], 0
    for b in boxes:
        n = b[bl.dim][1] - b[bl.dim][0]
        where = tuple(slice(at, at + n) if d == bl.dim else slice(None) for d in range(len(global_shape)))
        out.append((b, where))
        at += n
    return out


def take_local(full: Any, sbp: NdSbp, mesh_shape: Sequence[int], coord: Sequence[int]) -> Any:
    """The local at ``coord`` of the whole tensor ``full`` (a copy where the shard is several boxes)."""
    pieces = [full[tuple(slice(lo, hi) for lo, hi in b)] for b, _ in local_pieces(full.shape, sbp, mesh_shape, coord)]
    bl = blocked_of(sbp)
    return pieces[0] if bl is None else torch.cat(pieces, bl.dim)


def relative_shard(
    global_shape: Sequence[int], held: NdSbp, inner: NdSbp, mesh_shape: Sequence[int], coord: Sequence[int]
) -> tuple[slice, ...]:
    """Slices selecting ``coord``'s shard under ``inner`` inside its local under ``held``, where ``inner``
    only splits further a dim that ``held`` keeps whole (ZeRO's piece of a tensor-parallel shard)."""
    bl = blocked_of(held)
    if bl is None:
        h = shard_box(global_shape, held, mesh_shape, coord)
        return relative(shard_box(global_shape, inner, mesh_shape, coord), h)
    view, plain_held = view_of(global_shape, held)
    _, plain_inner = view_of(global_shape, inner)
    mine = shard_box(view, plain_held, mesh_shape, coord)
    rel = relative(shard_box(view, plain_inner, mesh_shape, coord), mine)
    for d in (bl.dim, bl.dim + 1):
        if rel[d] != slice(0, mine[d][1] - mine[d][0]):
            raise ValueError(f"{format_sbp(inner)} splits the blocked dim of {format_sbp(held)} further")
    return rel[: bl.dim] + (slice(None),) + rel[bl.dim + 2 :]
