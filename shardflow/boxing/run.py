"""Execute a boxing ``Plan`` on this rank's local tensor: a thin loop over the planner's steps.

Every collective is issued from the calling thread (so ``CommDebugMode`` sees it); a rank outside a step's
mesh skips the step, and a rank outside the target mesh ends with an empty local.
"""

from __future__ import annotations

import torch

from shardflow.boxing.plan import Plan, Step
from shardflow.comm import collectives as C
from shardflow.comm.groups import group_for
from shardflow.comm.init import world
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import NdSbp, S, _Partial
from shardflow.placement.shard import Box, box_shape, relative, shard_box


def empty_local(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The local of a rank outside a tensor's mesh."""
    return torch.empty(0, dtype=dtype, device=device)


def _sizes(shape: tuple[int, ...], sbp: NdSbp, mesh: Mesh, coord: tuple[int, ...], axis: int, dim: int) -> list[int]:
    """Extent along ``dim`` of the local of every member of ``coord``'s slice along ``axis``."""
    out = []
    for i in range(mesh.shape[axis]):
        c = coord[:axis] + (i,) + coord[axis + 1 :]
        out.append(box_shape(shard_box(shape, sbp, mesh.shape, c))[dim])
    return out


def _run_axis_step(step: Step, shape: tuple[int, ...], local: torch.Tensor, rank: int) -> torch.Tensor:
    mesh, axis = step.src_mesh, step.axis
    coord = mesh.coord_of(rank)
    me, k = coord[axis], mesh.shape[axis]
    old, new = step.src[axis], step.dst[axis]
    src_box = shard_box(shape, step.src, mesh.shape, coord)
    dst_box = shard_box(shape, step.dst, mesh.shape, coord)
    if step.kind == "slice":
        return local[relative(dst_box, src_box)].clone(memory_format=torch.contiguous_format)
    if step.kind == "mask":
        return local.clone() if me == 0 else torch.zeros_like(local)
    if step.kind == "pad":
        out = local.new_zeros(box_shape(dst_box))
        out[relative(src_box, dst_box)] = local
        return out
    if k == 1:
        return local
    g = group_for(mesh.axis_slice(axis, rank))
    if step.kind == "all_gather":
        assert isinstance(old, S)
        return C.all_gather(local, old.dim, _sizes(shape, step.src, mesh, coord, axis, old.dim), g)
    if step.kind == "reduce_scatter":
        assert isinstance(new, S)
        return C.reduce_scatter(local, new.dim, _sizes(shape, step.dst, mesh, coord, axis, new.dim), me, g)
    if step.kind == "all_reduce":
        return C.all_reduce(local, g)
    if step.kind == "all_to_all":
        assert isinstance(old, S) and isinstance(new, S)
        ins = _sizes(shape, step.src, mesh, coord, axis, old.dim)
        outs = _sizes(shape, step.dst, mesh, coord, axis, new.dim)
        return C.all_to_all(local, old.dim, new.dim, ins, outs, me, g)
    raise AssertionError(f"unknown step kind {step.kind!r}")


def _run_send_recv(
    step: Step, shape: tuple[int, ...], dtype: torch.dtype, local: torch.Tensor, rank: int
) -> torch.Tensor:
    src_mesh, dst_mesh = step.src_mesh, step.dst_mesh
    src_box: Box | None = None
    if rank in src_mesh:
        src_box = shard_box(shape, step.src, src_mesh.shape, src_mesh.coord_of(rank))
    out = empty_local(dtype, local.device if rank in src_mesh else dst_mesh.device)
    dst_box: Box | None = None
    if rank in dst_mesh:
        coord = dst_mesh.coord_of(rank)
        dst_box = shard_box(shape, step.dst, dst_mesh.shape, coord)
        zero = any(isinstance(p, _Partial) and c != 0 for p, c in zip(step.dst, coord))
        make = torch.zeros if zero else torch.empty
        out = make(box_shape(dst_box), dtype=dtype, device=dst_mesh.device)
    sends, recvs, landed = [], [], []
    for tag, t in enumerate(step.transfers):
        if t.src == rank and t.dst == rank:
            assert src_box is not None and dst_box is not None
            out[relative(t.box, dst_box)] = local[relative(t.box, src_box)]
        elif t.src == rank:
            assert src_box is not None
            sends.append((t.dst, local[relative(t.box, src_box)], tag))
        elif t.dst == rank:
            assert dst_box is not None
            buf = torch.empty(box_shape(t.box), dtype=dtype, device=out.device)
            recvs.append((t.src, buf, tag))
            landed.append((relative(t.box, dst_box), buf))
    if sends or recvs:
        C.exchange(sends, recvs)
    for where, buf in landed:
        out[where] = buf
    return out


def run_plan(plan: Plan, local: torch.Tensor) -> torch.Tensor:
    """This rank's local of the target layout, given its local of the source layout."""
    rank, _ = world()
    for step in plan.steps:
        if step.kind == "send_recv":
            local = _run_send_recv(step, plan.shape, plan.dtype, local, rank)
        elif rank in step.src_mesh:
            local = _run_axis_step(step, plan.shape, local, rank)
    if rank not in plan.dst_mesh:
        return empty_local(plan.dtype, local.device)
    return local
