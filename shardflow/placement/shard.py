"""Which box of the global tensor a mesh coordinate holds under an nd-SBP.

Splits follow ``torch.tensor_split``: of ``n`` rows over ``k`` parts, the first ``n % k`` parts get one
more. Splits of one dim on several axes nest in axis order: axis 0 splits first, then axis 1 splits each
piece. A shard is therefore always one contiguous box, which the boxing planner intersects.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardflow.placement.sbp import NdSbp, S

Box = tuple[tuple[int, int], ...]


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``n`` items are split into ``parts`` like tensor_split."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard_box(global_shape: Sequence[int], sbp: NdSbp, mesh_shape: Sequence[int], coord: Sequence[int]) -> Box:
    """The box (per dim ``[start, stop)``) held at mesh coordinate ``coord``; ``P`` and ``B`` keep the piece."""
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
    return box_shape(shard_box(global_shape, sbp, mesh_shape, coord))


def max_local_shape(global_shape: Sequence[int], sbp: NdSbp, mesh_shape: Sequence[int]) -> tuple[int, ...]:
    """The largest local shape over the mesh: the first coordinate of every axis is never smaller."""
    return local_shape(global_shape, sbp, mesh_shape, [0] * len(mesh_shape))
