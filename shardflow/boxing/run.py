"""Execute a boxing ``Plan`` on this rank's local tensor: a thin loop over the planner's steps.

Every collective is issued from the calling thread (so ``CommDebugMode`` sees it); a rank outside a step's
mesh skips the step, and a rank outside the target mesh ends with an empty local.

What a step needs besides the tensor (boxes, sizes, peers) depends only on the step, the shape and the
rank, so it is computed once per ``(plan, rank)`` and cached (plans are frozen and themselves cached by
``plan_boxing``). Process groups are looked up on every call: they belong to the running job, not the plan.

A step's result never aliases its input: where a step is the identity (an axis of size 1), it clones.
Steps planned on a view (a ``Blocked`` layout's unflattened shape) reshape the local to that view's local
shape first; the result is reshaped to the target's local shape (both are views of contiguous locals).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from shardflow.boxing.plan import Plan, Step
from shardflow.comm import collectives as C
from shardflow.comm.groups import group_for
from shardflow.comm.init import world
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import NdSbp, S, _Partial
from shardflow.placement.shard import box_shape, local_shape, relative, shard_box

Cut = tuple[slice, ...]


def empty_local(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The local of a rank outside a tensor's mesh."""
    return torch.empty(0, dtype=dtype, device=device)


@dataclass(frozen=True)
class _AxisArgs:
    """What a same-mesh step needs on one rank, besides the local."""

    me: int  # this rank's index along the step's axis
    members: tuple[int, ...]  # global ranks of this rank's slice along the axis, in axis order
    cut: Cut  # slice: the target box inside the local; pad: the local inside the target box
    dst_shape: tuple[int, ...]
    src_sizes: tuple[int, ...]  # every member's extent along the source's split dim (S sources only)
    dst_sizes: tuple[int, ...]  # every member's extent along the target's split dim (S targets only)


@dataclass(frozen=True)
class _P2PArgs:
    """What a ``send_recv`` step needs on one rank: ``(peer, where in my local/output, tag)`` lists."""

    in_src: bool  # this rank holds a local of the source mesh
    out_shape: tuple[int, ...] | None  # None: this rank is outside the target mesh
    zero: bool  # a target P coordinate other than the first: the output is zeros
    copies: tuple[tuple[Cut, Cut], ...]  # (from the local, into the output) on this rank
    sends: tuple[tuple[int, Cut, int], ...]
    recvs: tuple[tuple[int, Cut, int], ...]


def _sizes(shape: tuple[int, ...], sbp: NdSbp, mesh: Mesh, coord: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """Extent along ``sbp[axis]``'s split dim of the local of every member of ``coord``'s slice along ``axis``."""
    p = sbp[axis]
    if not isinstance(p, S):
        return ()
    out = []
    for i in range(mesh.shape[axis]):
        c = coord[:axis] + (i,) + coord[axis + 1 :]
        out.append(box_shape(shard_box(shape, sbp, mesh.shape, c))[p.dim])
    return tuple(out)


def _axis_args(step: Step, shape: tuple[int, ...], rank: int) -> _AxisArgs:
    mesh, axis = step.src_mesh, step.axis
    coord = mesh.coord_of(rank)
    src_box = shard_box(shape, step.src, mesh.shape, coord)
    dst_box = shard_box(shape, step.dst, mesh.shape, coord)
    cut = relative(src_box, dst_box) if step.kind == "pad" else relative(dst_box, src_box)
    return _AxisArgs(
        me=coord[axis],
        members=mesh.axis_slice(axis, rank),
        cut=cut,
        dst_shape=box_shape(dst_box),
        src_sizes=_sizes(shape, step.src, mesh, coord, axis),
        dst_sizes=_sizes(shape, step.dst, mesh, coord, axis),
    )


def _p2p_args(step: Step, shape: tuple[int, ...], rank: int) -> _P2PArgs:
    src_mesh, dst_mesh = step.src_mesh, step.dst_mesh
    src_box = shard_box(shape, step.src, src_mesh.shape, src_mesh.coord_of(rank)) if rank in src_mesh else None
    dst_box, zero = None, False
    if rank in dst_mesh:
        coord = dst_mesh.coord_of(rank)
        dst_box = shard_box(shape, step.dst, dst_mesh.shape, coord)
        zero = any(isinstance(p, _Partial) and c != 0 for p, c in zip(step.dst, coord))
    copies, sends, recvs = [], [], []
    for tag, t in enumerate(step.transfers):
        if t.src == rank and t.dst == rank:
            assert src_box is not None and dst_box is not None
            copies.append((relative(t.box, src_box), relative(t.box, dst_box)))
        elif t.src == rank:
            assert src_box is not None
            sends.append((t.dst, relative(t.box, src_box), tag))
        elif t.dst == rank:
            assert dst_box is not None
            recvs.append((t.src, relative(t.box, dst_box), tag))
    out_shape = None if dst_box is None else box_shape(dst_box)
    return _P2PArgs(src_box is not None, out_shape, zero, tuple(copies), tuple(sends), tuple(recvs))


@lru_cache(maxsize=4096)
def _prepare(plan: Plan, rank: int) -> tuple[_AxisArgs | _P2PArgs | None, ...]:
    """Per step: its arguments on ``rank``, or None where ``rank`` sits the step out."""
    out: list[_AxisArgs | _P2PArgs | None] = []
    for step in plan.steps:
        shape = plan.shape if step.view is None else step.view
        if step.kind == "send_recv":
            out.append(_p2p_args(step, shape, rank))
        else:
            out.append(_axis_args(step, shape, rank) if rank in step.src_mesh else None)
    return tuple(out)


@lru_cache(maxsize=4096)
def _prepared(
    plan: Plan, rank: int
) -> tuple[
    tuple[_AxisArgs | _P2PArgs | None, ...], tuple[tuple[tuple[int, ...] | None, ...], tuple[int, ...] | None] | None
]:
    """``_prepare`` and ``_views`` of ``plan`` on ``rank`` in one cached lookup (run_plan's hot path)."""
    return _prepare(plan, rank), _views(plan, rank)


def _views(plan: Plan, rank: int) -> tuple[tuple[tuple[int, ...] | None, ...], tuple[int, ...] | None] | None:
    """Per step, the local shape it takes on ``rank`` (None: unchanged), and the target's local shape;
    None for a plan without views (no reshapes)."""
    if all(step.view is None for step in plan.steps):
        return None
    before = []
    for step in plan.steps:
        shape = plan.shape if step.view is None else step.view
        mesh = step.src_mesh
        before.append(local_shape(shape, step.src, mesh.shape, mesh.coord_of(rank)) if rank in mesh else None)
    mesh = plan.dst_mesh
    after = local_shape(plan.shape, plan.dst_sbp, mesh.shape, mesh.coord_of(rank)) if rank in mesh else None
    return tuple(before), after


def _run_axis_step(step: Step, a: _AxisArgs, local: torch.Tensor) -> torch.Tensor:
    kind = step.kind
    if kind == "slice":
        return local[a.cut].clone(memory_format=torch.contiguous_format)
    if kind == "mask":
        return local.clone() if a.me == 0 else torch.zeros_like(local)
    if kind == "pad":  # zero only the slabs around the local, so that every element is written once
        out = local.new_empty(a.dst_shape)
        out[a.cut] = local
        for d, (cut, n) in enumerate(zip(a.cut, a.dst_shape)):
            if cut.start > 0:
                out.narrow(d, 0, cut.start).zero_()
            if cut.stop < n:
                out.narrow(d, cut.stop, n - cut.stop).zero_()
        return out
    if len(a.members) == 1:  # an axis of size 1: every collective is the identity
        return local.clone()
    g = group_for(a.members)
    old, new = step.src[step.axis], step.dst[step.axis]
    if kind == "all_gather":
        assert isinstance(old, S)
        return C.all_gather(local, old.dim, a.src_sizes, g)
    if kind == "reduce_scatter":
        assert isinstance(new, S)
        return C.reduce_scatter(local, new.dim, a.dst_sizes, a.me, g)
    if kind == "all_reduce":
        return C.all_reduce(local, g)
    if kind == "all_to_all":
        assert isinstance(old, S) and isinstance(new, S)
        return C.all_to_all(local, old.dim, new.dim, a.src_sizes, a.dst_sizes, a.me, g)
    raise AssertionError(f"unknown step kind {kind!r}")


def _run_send_recv(step: Step, a: _P2PArgs, dtype: torch.dtype, local: torch.Tensor) -> torch.Tensor:
    """Receive straight into the output where the target region is contiguous (row blocks of dim 0 are),
    else into a scratch buffer copied in afterwards."""
    if a.out_shape is None:
        out = empty_local(dtype, local.device if a.in_src else step.dst_mesh.device)
    else:
        out = (torch.zeros if a.zero else torch.empty)(a.out_shape, dtype=dtype, device=step.dst_mesh.device)
    for src_cut, dst_cut in a.copies:
        out[dst_cut] = local[src_cut]
    recvs, scratch = [], []
    for peer, cut, tag in a.recvs:
        where = out[cut]
        if not where.is_contiguous():
            buf = torch.empty(where.shape, dtype=dtype, device=out.device)
            scratch.append((cut, buf))
            where = buf
        recvs.append((peer, where, tag))
    sends = [(peer, local[cut], tag) for peer, cut, tag in a.sends]
    if sends or recvs:
        C.exchange(sends, recvs)
    for cut, buf in scratch:
        out[cut] = buf
    return out


def run_plan(plan: Plan, local: torch.Tensor) -> torch.Tensor:
    """This rank's local of the target layout, given its local of the source layout."""
    rank, _ = world()
    return _run_prepared(plan, rank, *_prepared(plan, rank), local)


def bound_plan(plan: Plan, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run_plan(plan, ·)`` for ``rank`` with its arguments worked out now: what a lowered program calls, so
    a step does no lookups and ``torch.compile`` traces only tensor work."""
    return functools.partial(_run_prepared, plan, rank, *_prepared(plan, rank))


def _run_prepared(
    plan: Plan,
    rank: int,
    prepared: tuple[_AxisArgs | _P2PArgs | None, ...],
    views: tuple[tuple[tuple[int, ...] | None, ...], tuple[int, ...] | None] | None,
    local: torch.Tensor,
) -> torch.Tensor:
    for i, (step, args) in enumerate(zip(plan.steps, prepared)):
        want = None if views is None else views[0][i]
        if want is not None and local.shape != want:
            local = local.reshape(want)
        if isinstance(args, _P2PArgs):
            local = _run_send_recv(step, args, plan.dtype, local)
        elif args is not None:
            local = _run_axis_step(step, args, local)
    if rank not in plan.dst_mesh:
        return empty_local(plan.dtype, local.device)
    if views is not None and views[1] is not None and local.shape != views[1]:
        local = local.reshape(views[1])
    return local


def can_start(plan: Plan, rank: int) -> bool:
    """Whether ``plan`` is one all-gather that ``rank`` takes part in with others: such a plan can be
    launched early (``start_plan``) and its result picked up later (``finish_plan``)."""
    if len(plan.steps) != 1 or plan.steps[0].kind != "all_gather" or plan.steps[0].view is not None:
        return False
    args = _prepare(plan, rank)[0]
    return isinstance(args, _AxisArgs) and len(args.members) > 1


def start_plan(plan: Plan, local: torch.Tensor) -> C.Gathering:
    """Launch the all-gather plan (``can_start``) without waiting: a prefetch of what ``run_plan`` returns."""
    step, args = plan.steps[0], _prepare(plan, world()[0])[0]
    assert isinstance(args, _AxisArgs)
    split = step.src[step.axis]
    assert isinstance(split, S)
    return C.all_gather_start(local, split.dim, args.src_sizes, group_for(args.members))


def finish_plan(handle: C.Gathering) -> torch.Tensor:
    """Wait for a plan launched by ``start_plan``; its result equals ``run_plan``'s."""
    return C.all_gather_finish(handle)


def reduce_scatter_args(plan: Plan, rank: int) -> tuple[tuple[int, ...], int, tuple[int, ...], int] | None:
    """For a plan that is one reduce-scatter ``rank`` takes part in with others: (the members' ranks, the
    split dim, every member's extent along it, ``rank``'s index among them), so several such plans can
    share one collective (``comm.collectives.reduce_scatter_start``); else None."""
    if len(plan.steps) != 1 or plan.steps[0].kind != "reduce_scatter" or plan.steps[0].view is not None:
        return None
    step, args = plan.steps[0], _prepare(plan, rank)[0]
    split = step.dst[step.axis]
    if not isinstance(args, _AxisArgs) or len(args.members) < 2 or not isinstance(split, S):
        return None
    return tuple(args.members), split.dim, tuple(args.dst_sizes), args.me
