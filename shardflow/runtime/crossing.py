"""How a pipeline's activations, and their gradients, cross from one stage's ranks to the next stage's.

A stage is data parallel over its own ranks, so every tensor a stage hands on is one logical tensor laid
out ``S(0)`` over that stage's ranks (each rank holds its rows of the micro-batch, cut like
``tensor_split``) and must arrive ``S(0)`` over the next stage's ranks. Which rows go from which rank to
which is the foundation's cross-mesh boxing plan (``boxing/plan.py``, a ``send_recv`` step), so stages of
different sizes work: one rank hands its rows to three, or two hand theirs to one. Stages of equal size pair
rank ``d`` with rank ``d``, one message each. A tensor-parallel stage holds each row on all its ``tp`` ranks
(``(S(0), B)`` on its ``(dp, tp)`` mesh): forward, one copy is sent to each rank that needs it; gradients go
back by the plan the other way, so that every rank of the stage before gets each of its rows once.

Each rank knows only its own shards' shapes (a stage module is exported for its shard's shape), so every
rank shares the row counts of what it hands on once, at set-up; the plan then follows from the global row
counts alone, the same on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from shardflow.boxing.plan import plan_boxing
from shardflow.comm.init import world
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, S
from shardflow.placement.shard import relative, shard_box, split_range
from shardflow.runtime.stage_grid import StageGrid


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of this rank's local tensor go to (or come from) global rank ``peer``."""

    peer: int
    start: int
    stop: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


Pieces = dict[int, list[Piece]]  # global rank -> what it sends, or what it receives (a rank does one or the other)


def crossing(
    rows: tuple[int, ...],
    dst_rows: tuple[int, ...],
    rest: tuple[int, ...],
    dtype: torch.dtype,
    src: Mesh,
    dst: Mesh,
    what: str,
) -> tuple[Pieces, Pieces]:
    """The pieces of one boundary tensor forward (``src`` to ``dst``) and of its gradient back.

    ``src`` and ``dst`` are ``(dp, tp)`` meshes: rows are split over ``dp`` and every ``tp`` rank holds its
    row's copy, so the layout is ``(S(0), B)`` on both. ``rows[i]``: dim 0 of the tensor on ``src``'s ``i``-th
    data-parallel rank; ``dst_rows[i]``: the rows ``dst``'s ``i``-th expects; ``rest``: the other dims. Forward,
    one holder of each row sends it to every rank that needs it; back, every rank of ``src`` receives the
    gradient of each of its rows once (from one of ``dst``'s copies), so the two plans differ when ``tp > 1``.
    """
    n = sum(rows)
    for mesh, counts, side in ((src, rows, "hands on"), (dst, dst_rows, "expects")):
        parts = mesh.shape[0]
        cut = tuple(b - a for a, b in (split_range(sum(counts), parts, i) for i in range(parts)))
        if sum(counts) != n or counts != cut:
            raise ValueError(
                f"{what}: the stage on ranks {list(src.ranks)} hands on rows {list(rows)} and the stage on ranks "
                f"{list(dst.ranks)} expects rows {list(dst_rows)} (the stage on ranks {list(mesh.ranks)} {side} "
                f"{list(counts)}, not a tensor_split of {sum(counts)} rows). Stages of different sizes need tensors "
                "whose dim 0 is the batch at every split point: pick split points where that holds"
            )
    return _pieces((n, *rest), dtype, src, dst), _pieces((n, *rest), dtype, dst, src)


def _pieces(shape: tuple[int, ...], dtype: torch.dtype, src: Mesh, dst: Mesh) -> Pieces:
    layout = (S(0), B)
    (step,) = plan_boxing(shape, dtype, src, layout, dst, layout).steps
    out: Pieces = {}
    for t in step.transfers:  # each box's rows inside the sender's and the receiver's own shard
        sent = relative(t.box, shard_box(shape, layout, src.shape, src.coord_of(t.src)))[0]
        got = relative(t.box, shard_box(shape, layout, dst.shape, dst.coord_of(t.dst)))[0]
        out.setdefault(t.src, []).append(Piece(t.dst, sent.start, sent.stop))
        out.setdefault(t.dst, []).append(Piece(t.src, got.start, got.stop))
    return out


@dataclass
class Crossings:
    """What one rank exchanges at its stage's boundaries for one micro-batch, per boundary tensor."""

    recv: list[list[Piece]]  # activations from the stage before
    send: list[list[Piece]]  # activations to the stage after
    grads_in: list[list[Piece]]  # gradients of what it sent, from the stage after
    grads_out: list[list[Piece]]  # gradients of what it received, to the stage before


class Move(NamedTuple):
    """Rows one rank sends another across a boundary (for ``explain``)."""

    src: int
    dst: int
    rows: int


class BoundaryNote(NamedTuple):
    """A boundary's tensors per micro-batch and who sends which rows of the first to whom."""

    tensors: int
    moves: list[Move]


def stage_crossings(
    metas: Sequence[Sequence[Sequence[tuple[Any, torch.dtype]]]], grid: StageGrid
) -> tuple[list[Crossings], dict[int, BoundaryNote]]:
    """Per micro-batch, what this rank exchanges with the stages beside it: the pieces of each tensor it
    receives from the stage before and of each tensor it sends to the stage after, and those of their
    gradients; and per boundary a note for ``explain``. ``metas``: per micro-batch, the shape and dtype of
    every tensor each stage returns on this rank's shard. Collective over the job (every rank shares its
    boundary row counts)."""
    # dim 0 (1 for a 0-d tensor) and the other dims of every boundary tensor on this rank's shard
    mine = [[[(tuple(shape) or (1,), dtype) for shape, dtype in meta] for meta in m] for m in metas]
    every: list[Any] = [mine]
    if grid.flat[0].virtual:  # a cost model's rank: every rank's shard taken to be this one's (even splits)
        every = [mine] * world()[1]
    elif dist.is_initialized() and world()[1] > 1:
        every = [None] * world()[1]
        dist.all_gather_object(every, mine)
    grids, flat, stage = grid.grids, grid.flat, grid.stage
    me = grids[stage][grid.dp_index][grid.tp_index]
    notes: dict[int, BoundaryNote] = {}
    out: list[Crossings] = []
    for j in range(len(metas)):
        c = Crossings([], [], [], [])
        for b in range(len(grids) - 1):
            src, dst = [row[0] for row in grids[b]], [row[0] for row in grids[b + 1]]
            for k, (shape, dtype) in enumerate(every[src[0]][j][b]):  # every rank checks every boundary
                what = f"tensor {k} from stage {b} to stage {b + 1} (micro-batch {j})"
                rows = tuple(every[r][j][b][k][0][0] for r in src)
                expect = tuple(every[r][j][b][k][0][0] for r in dst)
                ahead, back = crossing(rows, expect, shape[1:], dtype, flat[b], flat[b + 1], what)
                if j == 0 and k == 0:
                    moves = [Move(r, p.peer, p.stop - p.start) for r in flat[b].ranks for p in ahead.get(r, [])]
                    notes[b] = BoundaryNote(len(every[src[0]][j][b]), moves)
                if stage == b:
                    c.send.append(ahead.get(me, []))
                    c.grads_in.append(back.get(me, []))
                elif stage == b + 1:
                    c.recv.append(ahead.get(me, []))
                    c.grads_out.append(back.get(me, []))
        out.append(c)
    return out, notes
