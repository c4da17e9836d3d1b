"""Conversion to and from ``torch.distributed.tensor.DTensor`` where the layouts mean the same thing.

DTensor's ``Shard`` splits like ``torch.chunk``; shardflow's ``S`` like ``torch.tensor_split``. The two
agree exactly when every split piece divides evenly, so only those layouts convert; others raise.
Nested shards of one dim nest left to right in both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, Blocked, NdSbp, P, S, _Partial, format_sbp
from shardflow.tensor.api import from_local
from shardflow.tensor.global_tensor import GlobalTensor

_DEVICE_MESHES: dict[Mesh, DeviceMesh] = {}


def device_mesh(mesh: Mesh) -> DeviceMesh:
    """The DeviceMesh of ``mesh`` (created once; collective over the job the first time)."""
    if mesh not in _DEVICE_MESHES:
        grid = torch.tensor(mesh.ranks, dtype=torch.int64).reshape(mesh.shape)
        _DEVICE_MESHES[mesh] = DeviceMesh(mesh.device_type, grid, mesh_dim_names=mesh.names)
    return _DEVICE_MESHES[mesh]


def _check_even(shape: tuple[int, ...], sbp: NdSbp, mesh_shape: tuple[int, ...]) -> None:
    piece = list(shape)
    for axis, p in enumerate(sbp):
        if isinstance(p, Blocked):
            raise ValueError(
                f"sbp {format_sbp(sbp)} has no DTensor placement ({p} splits each block); redistribute to "
                f"S({p.dim}) or B first"
            )
        if isinstance(p, S):
            if piece[p.dim] % mesh_shape[axis]:
                raise ValueError(
                    f"sbp {format_sbp(sbp)} splits dim {p.dim} of shape {shape} unevenly on mesh axis {axis} "
                    f"(size {mesh_shape[axis]}); DTensor chunks differently there, so only even splits convert"
                )
            piece[p.dim] //= mesh_shape[axis]


def to_dtensor(x: GlobalTensor) -> DTensor:
    """The same logical tensor as a DTensor (shares the local shard). Not differentiable across."""
    _check_even(tuple(x.shape), x.sbp, x.mesh.shape)
    placements: list[Any] = [
        Shard(p.dim) if isinstance(p, S) else (Partial() if isinstance(p, _Partial) else Replicate()) for p in x.sbp
    ]
    return DTensor.from_local(
        x._local, device_mesh(x.mesh), placements, run_check=False, shape=x.shape, stride=x.stride()
    )


def from_dtensor(d: DTensor, mesh: Mesh) -> GlobalTensor:
    """The same logical tensor as a GlobalTensor on ``mesh`` (the mesh of ``d``'s device mesh)."""
    sbp: list[Any] = []
    for pl in d.placements:
        if type(pl) is Shard:
            sbp.append(S(pl.dim))
        elif isinstance(pl, Replicate):
            sbp.append(B)
        elif isinstance(pl, Partial) and pl.reduce_op == "sum":
            sbp.append(P)
        else:
            raise ValueError(f"DTensor placement {pl!r} has no shardflow layout (only Shard, Replicate, Partial(sum))")
    nd = tuple(sbp)
    _check_even(tuple(d.shape), nd, mesh.shape)
    return from_local(d.to_local(), mesh, nd, shape=tuple(d.shape))
