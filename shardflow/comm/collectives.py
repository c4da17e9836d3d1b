"""Collectives on tensor pieces, over a group in mesh-axis order, with uneven sizes handled.

Rules every function here keeps:

- Inputs are never modified (autograd may still need them), and results never alias them: a result is a
  freshly allocated buffer or a view of one. torch.distributed's out-of-place collectives (all-gather,
  reduce-scatter, all-to-all) only read their input, so an input that already has the collective's
  layout is handed to it as is.
- Every call issues exactly one torch.distributed collective, so that ``CommDebugMode`` counts the route.
- Copies are kept to the one that the layout needs. The common case (even pieces, group order equal to
  axis order, split on the outermost dim) copies nothing outside the collective: the collective's own
  output buffer is the result. Uneven pieces are padded to the largest (gloo needs equal chunks) and
  reordered groups permuted with a single pack or ``torch.cat``.
- Results are contiguous, except a reduce-scatter's uneven piece on an inner dim (a narrowed view of the
  output buffer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from shardflow.comm.groups import GroupHandle

# torch 2.13 renamed the single-tensor collectives; older versions have only the old names.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _in_axis_order(g: GroupHandle) -> bool:
    """Whether group rank ``r`` is axis index ``r`` (then blocks need no permutation)."""
    return all(a == r for r, a in enumerate(g.order))


def _outermost(shape: Sequence[int], dim: int) -> bool:
    """Whether blocks along ``dim`` of a contiguous ``shape`` tensor are contiguous and in order in memory."""
    return math.prod(shape[:dim]) == 1


def _set(shape: Sequence[int], *pairs: tuple[int, int]) -> list[int]:
    """``shape`` with ``dim -> n`` replaced for every ``(dim, n)`` in ``pairs``."""
    out = list(shape)
    for d, n in pairs:
        out[d] = n
    return out


def _padded(t: torch.Tensor, dim: int, m: int) -> torch.Tensor:
    """``t`` contiguous with extent ``m`` along ``dim`` (zero padding at the end); ``t`` itself if it is so."""
    if t.shape[dim] == m:
        return t.contiguous()
    out = t.new_zeros(_set(t.shape, (dim, m)))
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def all_gather(local: torch.Tensor, dim: int, sizes: Sequence[int], g: GroupHandle) -> torch.Tensor:
    """Concatenate the members' pieces along ``dim``; ``sizes[i]`` is member i's extent along ``dim``.

    Each member sends its (padded) local as is; the output buffer holds group rank r's piece at block r.
    With even sizes, axis order and ``dim`` outermost, that buffer is the result. Otherwise one ``torch.cat``
    of the blocks narrowed to their sizes, in axis order, builds it (one copy, contiguous).
    """
    return all_gather_finish(all_gather_start(local, dim, sizes, g))


@dataclass(frozen=True)
class Gathering:
    """An all-gather on its way: ``all_gather_finish`` waits for it and assembles the result."""

    work: Any  # the collective's handle; None when there is nothing to move
    buf: torch.Tensor  # the members' (padded) pieces, block r from group rank r
    out_shape: tuple[int, ...]
    piece_shape: tuple[int, ...]
    dim: int
    sizes: tuple[int, ...]
    g: GroupHandle


def all_gather_start(local: torch.Tensor, dim: int, sizes: Sequence[int], g: GroupHandle) -> Gathering:
    """``all_gather`` launched without waiting (a prefetch): ``all_gather_finish`` gives its result."""
    m = max(sizes)
    out_shape = tuple(_set(local.shape, (dim, sum(sizes))))
    if math.prod(out_shape) == 0:  # every member knows this: nothing to move
        return Gathering(None, local.new_empty(out_shape), out_shape, (), dim, tuple(sizes), g)
    piece = _padded(local, dim, m)
    buf = local.new_empty((g.size * piece.shape[0], *piece.shape[1:]))  # gloo wants the blocks on dim 0
    work = all_gather_single(buf, piece, group=g.group, async_op=True)
    return Gathering(work, buf, out_shape, tuple(piece.shape), dim, tuple(sizes), g)


def all_gather_finish(h: Gathering) -> torch.Tensor:
    """Wait for the gathering ``h`` and return the members' pieces concatenated along its dim."""
    if h.work is None:
        return h.buf
    h.work.wait()
    m = max(h.sizes)
    if all(n == m for n in h.sizes) and _in_axis_order(h.g) and _outermost(h.piece_shape, h.dim):
        return h.buf.view(h.out_shape)
    blocks = h.buf.view(h.g.size, *h.piece_shape)
    grank_of = {a: r for r, a in enumerate(h.g.order)}
    return torch.cat([blocks[grank_of[a]].narrow(h.dim, 0, h.sizes[a]) for a in range(h.g.size)], h.dim)


def reduce_scatter(full: torch.Tensor, dim: int, sizes: Sequence[int], me: int, g: GroupHandle) -> torch.Tensor:
    """Sum ``full`` over the members and keep member ``me``'s piece (``sizes`` along ``dim``).

    The collective's input is ``full`` itself when sizes are even, the group is in axis order and ``dim``
    is outermost; otherwise one pack copies the pieces (padded, in group order) into a fresh buffer.
    """
    k, m = g.size, max(sizes)
    block = _set(full.shape, (dim, m))
    if full.numel() == 0:
        return full.new_empty(_set(full.shape, (dim, sizes[me])))
    even = all(n == m for n in sizes)
    if even and _in_axis_order(g) and _outermost(full.shape, dim):
        stacked = full.contiguous()
    else:
        stacked = (full.new_empty if even else full.new_zeros)((k, *block))
        starts = [sum(sizes[:a]) for a in range(k)]
        for r, a in enumerate(g.order):
            stacked[r].narrow(dim, 0, sizes[a]).copy_(full.narrow(dim, starts[a], sizes[a]))
    out = full.new_empty(block)
    _reduce_scatter_single(out, stacked.view(k * block[0], *block[1:]), group=g.group)
    return out if sizes[me] == m else out.narrow(dim, 0, sizes[me])


@dataclass(frozen=True)
class ReduceScattering:
    """Several tensors' reduce-scatters in one collective, on their way (``reduce_scatter_finish`` waits)."""

    work: Any
    out: torch.Tensor  # this member's pieces, padded, one after another
    pieces: tuple[tuple[tuple[int, ...], int, int], ...]  # per tensor: padded block shape, dim, own extent


def reduce_scatter_start(
    fulls: Sequence[torch.Tensor], dims: Sequence[int], sizes: Sequence[Sequence[int]], me: int, g: GroupHandle
) -> ReduceScattering:
    """Sum each of ``fulls`` over the members and keep member ``me``'s piece of it (``sizes[i]`` along
    ``dims[i]``), in one asynchronous collective: each tensor's pieces are packed, padded to the largest,
    into row ``r`` of one buffer (group rank r's piece), so one reduce-scatter moves them all (FSDP's copy-in)."""
    k = g.size
    blocks = [tuple(_set(f.shape, (d, max(n)))) for f, d, n in zip(fulls, dims, sizes)]
    widths = [math.prod(b) for b in blocks]
    packed = fulls[0].new_zeros((k, sum(widths)))
    offset = 0
    for f, d, n, b, w in zip(fulls, dims, sizes, blocks, widths):
        starts = [sum(n[:a]) for a in range(k)]
        for r, a in enumerate(g.order):
            packed[r, offset : offset + w].view(b).narrow(d, 0, n[a]).copy_(f.narrow(d, starts[a], n[a]))
        offset += w
    out = packed.new_empty(sum(widths))
    work = _reduce_scatter_single(out, packed.view(-1), group=g.group, async_op=True)
    return ReduceScattering(work, out, tuple((b, d, n[me]) for b, d, n in zip(blocks, dims, sizes)))


def reduce_scatter_finish(h: ReduceScattering) -> list[torch.Tensor]:
    """Wait for ``h``; this member's piece of every tensor, in order (views of one buffer)."""
    h.work.wait()
    out, offset = [], 0
    for block, dim, own in h.pieces:
        w = math.prod(block)
        piece = h.out[offset : offset + w].view(block)
        out.append(piece if own == block[dim] else piece.narrow(dim, 0, own))
        offset += w
    return out


def all_gather_rows(row: torch.Tensor) -> torch.Tensor:
    """Stack one equal-sized row from every rank of the job (rank order), e.g. to share metadata."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return row[None]
    flat = row.reshape(-1).contiguous()  # gloo wants a flat output of world * numel
    out = torch.empty(dist.get_world_size() * flat.numel(), dtype=row.dtype, device=row.device)
    all_gather_single(out, flat)
    return out.view(dist.get_world_size(), *row.shape)


def all_reduce(local: torch.Tensor, g: GroupHandle) -> torch.Tensor:
    """Sum over the members. torch's all-reduce works in place, so it runs on a clone: the one copy."""
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
    """From pieces split along ``src_dim`` (``in_sizes``) to pieces split along ``dst_dim`` (``out_sizes``).

    Send: the slab of ``local`` for group rank r (``out_sizes`` along ``dst_dim``) goes to block r of the
    send buffer. That is ``local`` itself when the group is in axis order and ``dst_dim`` is outermost;
    otherwise one pack copy (needed whenever the layout changes, e.g. S(0) -> S(1); the raw collective
    does not pay it). Receive: the blocks, one per source, concatenated along ``src_dim`` in axis order.
    With axis order and ``src_dim`` outermost the receive buffer is the result; otherwise one ``torch.cat``.
    """
    k = g.size
    out_shape = _set(local.shape, (src_dim, sum(in_sizes)), (dst_dim, out_sizes[me]))
    rest = [n for d, n in enumerate(local.shape) if d not in (src_dim, dst_dim)]
    if math.prod(rest) == 0 or sum(in_sizes) == 0 or sum(out_sizes) == 0:
        return local.new_empty(out_shape)
    ordered = _in_axis_order(g)
    sends = [_set(local.shape, (dst_dim, out_sizes[a])) for a in g.order]
    send_counts = [math.prod(s) for s in sends]
    if ordered and _outermost(local.shape, dst_dim):
        send = local.contiguous().view(-1)
    else:
        send = local.new_empty(local.numel())
        starts = [sum(out_sizes[:a]) for a in range(k)]
        for block, shape, a in zip(send.split(send_counts), sends, g.order):
            block.view(shape).copy_(local.narrow(dst_dim, starts[a], out_sizes[a]))
    recvs = [_set(out_shape, (src_dim, in_sizes[a])) for a in g.order]
    recv_counts = [math.prod(s) for s in recvs]
    if ordered and _outermost(out_shape, src_dim):
        out = local.new_empty(out_shape)
        dist.all_to_all_single(out.view(-1), send, recv_counts, send_counts, group=g.group)
        return out
    recv = local.new_empty(sum(recv_counts))
    dist.all_to_all_single(recv, send, recv_counts, send_counts, group=g.group)
    blocks = [b.view(s) for b, s in zip(recv.split(recv_counts), recvs)]
    grank_of = {a: r for r, a in enumerate(g.order)}
    return torch.cat([blocks[grank_of[a]] for a in range(k)], src_dim)


def exchange(sends: Sequence[tuple[int, torch.Tensor, int]], recvs: Sequence[tuple[int, torch.Tensor, int]]) -> None:
    """Point-to-point ``(global peer rank, tensor, tag)``: post every receive and send, then wait for all.

    Receive tensors must be contiguous (they are written in place, possibly as views of a caller's buffer);
    send tensors are made contiguous here (a copy only if they are not).
    """
    bufs = [t.contiguous() for _, t, _ in sends]
    works = [dist.irecv(buf, src=peer, tag=tag) for peer, buf, tag in recvs]
    works += [dist.isend(b, dst=peer, tag=tag) for (peer, _, tag), b in zip(sends, bufs)]
    for w in works:
        if w is not None:
            w.wait()
