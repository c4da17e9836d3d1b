"""What a compiled step's optimizer steps for each parameter: all of this rank's shard, or under ZeRO-1/2
the piece of it the plan's ``optim`` layout gives this rank.

A piece is a view of the rows this rank owns, split over the data-parallel axis; its gradient and optimizer
state take that piece's layout, and the updated pieces are all-gathered after each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shardflow.comm.init import world
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import NdSbp, grad_sbp
from shardflow.placement.shard import relative_shard
from shardflow.plan import ParamPlan
from shardflow.tensor.global_tensor import GlobalTensor


@dataclass(frozen=True)
class OptimizerPiece:
    """One parameter as the optimizer sees it on this rank."""

    sbp: NdSbp  # layout of the optimizer's parameter, its gradient and its state
    slice: tuple[slice, ...] | None  # where it lies in the parameter's local tensor (None: all of it)
    grad_sbp: NdSbp | None  # ZeRO-2: the layout the program returns the piece's gradient in


def optimizer_pieces(params: Sequence[GlobalTensor], entries: Sequence[ParamPlan], mesh: Mesh) -> list[OptimizerPiece]:
    """Each parameter's piece on this rank, from its plan entry."""
    rank = world()[0]
    out = []
    for gp, entry in zip(params, entries):
        if entry.optim == grad_sbp(entry.sbp) or rank not in mesh:  # it steps its whole local
            out.append(OptimizerPiece(entry.optim if rank in mesh else grad_sbp(gp.sbp), None, None))
            continue
        where = relative_shard(tuple(gp.shape), gp.sbp, entry.optim, mesh.shape, mesh.coord_of(rank))
        grad = entry.grad if entry.grad != grad_sbp(entry.compute) else None
        out.append(OptimizerPiece(entry.optim, where, grad))
    return out
