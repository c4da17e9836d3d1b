"""How a pipeline's activations, and their gradients, cross from one stage's ranks to the next stage's.

A stage is data parallel over its own ranks, so every tensor a stage hands on is one logical tensor laid
out ``S(0)`` over that stage's ranks (each rank holds its rows of the micro-batch, cut like
``tensor_split``) and must arrive ``S(0)`` over the next stage's ranks. Which rows go from which rank to
which is the foundation's cross-mesh boxing plan (``boxing/plan.py``, a ``send_recv`` step), so stages of
different sizes work: one rank hands its rows to three, or two hand theirs to one. Stages of equal size pair
rank ``d`` with rank ``d``, one message each. A gradient goes back along the same transfers reversed (the
adjoint of a send is a send the other way), so it needs no plan of its own.

Each rank knows only its own shards' shapes (a stage module is exported for its shard's shape), so every
rank shares the row counts of what it hands on once, at set-up; the plan then follows from the global row
counts alone, the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardflow.boxing.plan import plan_boxing
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import S
from shardflow.placement.shard import split_range


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of this rank's local tensor go to (or come from) global rank ``peer``."""

    peer: int
    start: int
    stop: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


def crossing(
    rows: tuple[int, ...],
    dst_rows: tuple[int, ...],
    rest: tuple[int, ...],
    dtype: torch.dtype,
    src: Mesh,
    dst: Mesh,
    what: str,
) -> dict[int, list[Piece]]:
    """Pieces each rank sends (ranks of ``src``) or receives (ranks of ``dst``) for one boundary tensor.

    ``rows[i]``: dim 0 of the tensor on ``src``'s ``i``-th rank; ``dst_rows[i]``: the rows ``dst``'s ``i``-th
    rank expects; ``rest``: the other dims. A rank in both meshes would copy locally; stages never share one.
    """
    n = sum(rows)
    for mesh, counts, side in ((src, rows, "hands on"), (dst, dst_rows, "expects")):
        cut = tuple(b - a for a, b in (split_range(sum(counts), mesh.size, i) for i in range(mesh.size)))
        if sum(counts) != n or counts != cut:
            raise ValueError(
                f"{what}: the stage on ranks {list(src.ranks)} hands on rows {list(rows)} and the stage on ranks "
                f"{list(dst.ranks)} expects rows {list(dst_rows)} (the stage on ranks {list(mesh.ranks)} {side} "
                f"{list(counts)}, not a tensor_split of {sum(counts)} rows). Stages of different sizes need tensors "
                "whose dim 0 is the batch at every split point: pick split points where that holds"
            )
    plan = plan_boxing((n, *rest), dtype, src, (S(0),), dst, (S(0),))
    (step,) = plan.steps
    pieces: dict[int, list[Piece]] = {}
    for t in step.transfers:
        (lo, hi), *_ = t.box
        a = split_range(n, src.size, src.ranks.index(t.src))[0]
        b = split_range(n, dst.size, dst.ranks.index(t.dst))[0]
        pieces.setdefault(t.src, []).append(Piece(t.dst, lo - a, hi - a))
        pieces.setdefault(t.dst, []).append(Piece(t.src, lo - b, hi - b))
    return pieces
