"""Collectives on tensor pieces, over a group in mesh-axis order, with uneven sizes handled.

gloo's ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` need equal chunks: uneven shards are padded
to the largest and the padding stripped. Inputs are never modified (autograd may still need them); every
call issues exactly one torch.distributed collective so that ``CommDebugMode`` counts the route.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shardflow.comm.groups import GroupHandle

# torch 2.13 renamed the single-tensor collectives; 2.11 (the GPU image) has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _pad_dim0(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = [0, 0] * (t.dim() - 1) + [0, rows - t.shape[0]]
    return F.pad(t, pad)


def all_gather(local: torch.Tensor, dim: int, sizes: Sequence[int], g: GroupHandle) -> torch.Tensor:
    """Concatenate the members' pieces along ``dim``; ``sizes[i]`` is member i's extent along ``dim``."""
    k, m = g.size, max(sizes)
    out_shape = list(local.shape)
    out_shape[dim] = sum(sizes)
    if math.prod(out_shape) == 0:  # every member knows this: nothing to move
        return local.new_empty(out_shape)
    piece = _pad_dim0(local.movedim(dim, 0), m).contiguous()
    out = torch.empty((k * m, *piece.shape[1:]), dtype=local.dtype, device=local.device)
    _all_gather_single(out, piece, group=g.group)
    chunks = out.split(m)
    parts = [None] * k
    for grank, axis_i in enumerate(g.order):
        parts[axis_i] = chunks[grank][: sizes[axis_i]]
    return torch.cat(parts, 0).movedim(0, dim)  # type: ignore[arg-type]


def reduce_scatter(full: torch.Tensor, dim: int, sizes: Sequence[int], me: int, g: GroupHandle) -> torch.Tensor:
    """Sum ``full`` over the members and keep member ``me``'s piece (``sizes`` along ``dim``)."""
    m = max(sizes)
    if full.numel() == 0:
        out_shape = list(full.shape)
        out_shape[dim] = sizes[me]
        return full.new_empty(out_shape)
    pieces = full.movedim(dim, 0).split(list(sizes))
    stacked = torch.cat([_pad_dim0(pieces[axis_i], m) for axis_i in g.order], 0).contiguous()
    out = torch.empty((m, *stacked.shape[1:]), dtype=full.dtype, device=full.device)
    _reduce_scatter_single(out, stacked, group=g.group)
    return out[: sizes[me]].movedim(0, dim)


def all_gather_rows(row: torch.Tensor) -> torch.Tensor:
    """Stack one equal-sized row from every rank of the job (rank order), e.g. to share metadata."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return row[None]
    flat = row.reshape(-1).contiguous()
    out = torch.empty(dist.get_world_size() * flat.numel(), dtype=row.dtype, device=row.device)
    _all_gather_single(out, flat)
    return out.view(dist.get_world_size(), *row.shape)


def all_reduce(local: torch.Tensor, g: GroupHandle) -> torch.Tensor:
    out = local.clone(memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    dist.all_reduce(out, group=g.group)
    return out


def all_to_all(
    local: torch.Tensor,
    src_dim: int,
    dst_dim: int,
    in_sizes: Sequence[int],
    out_sizes: Sequence[int],
    me: int,
    g: GroupHandle,
) -> torch.Tensor:
    """From pieces split along ``src_dim`` (``in_sizes``) to pieces split along ``dst_dim`` (``out_sizes``)."""
    rest = [n for d, n in enumerate(local.shape) if d not in (src_dim, dst_dim)]
    if math.prod(rest) == 0 or sum(in_sizes) == 0 or sum(out_sizes) == 0:
        shape = list(local.shape)
        shape[src_dim], shape[dst_dim] = sum(in_sizes), out_sizes[me]
        return local.new_empty(shape)
    sends = local.split(list(out_sizes), dim=dst_dim)
    send_order = [sends[axis_i].contiguous() for axis_i in g.order]
    recv_shapes = []
    for axis_i in g.order:
        shape = list(local.shape)
        shape[src_dim] = in_sizes[axis_i]
        shape[dst_dim] = out_sizes[me]
        recv_shapes.append(shape)
    send_buf = torch.cat([s.reshape(-1) for s in send_order])
    recv_numels = [int(torch.Size(s).numel()) for s in recv_shapes]
    recv_buf = torch.empty(sum(recv_numels), dtype=local.dtype, device=local.device)
    dist.all_to_all_single(recv_buf, send_buf, recv_numels, [s.numel() for s in send_order], group=g.group)
    received = [None] * g.size
    for grank, (chunk, shape) in enumerate(zip(recv_buf.split(recv_numels), recv_shapes)):
        received[g.order[grank]] = chunk.view(shape)
    return torch.cat(received, dim=src_dim)  # type: ignore[arg-type]


def exchange(sends: Sequence[tuple[int, torch.Tensor, int]], recvs: Sequence[tuple[int, torch.Tensor, int]]) -> None:
    """Point-to-point ``(global peer rank, tensor, tag)``: post every receive and send, then wait for all."""
    bufs = [t.contiguous() for _, t, _ in sends]
    works = [dist.irecv(buf, src=peer, tag=tag) for peer, buf, tag in recvs]
    works += [dist.isend(b, dst=peer, tag=tag) for (peer, _, tag), b in zip(sends, bufs)]
    for w in works:
        if w is not None:
            w.wait()
