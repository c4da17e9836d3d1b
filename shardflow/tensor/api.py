"""Making GlobalTensors: ``distribute`` a full tensor from one rank, or wrap each rank's shard.

``distribute`` is boxing from a one-rank mesh holding the value (``B`` on ``[src]``) to the target layout,
so scatter/broadcast need no code of their own. ``from_local`` learns the global shape from one
all-gather of the shard shapes over the job (ranks outside the mesh need it too) and checks that the
shards tile the shape the ``torch.tensor_split`` way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shardflow.boxing import empty_local
from shardflow.comm.collectives import all_gather_rows
from shardflow.comm.init import world
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, NdSbp, Placement, _Partial, format_sbp, is_split, normalize_sbp
from shardflow.placement.shard import local_shape
from shardflow.tensor.global_tensor import GlobalTensor, _FromLocal, box, wrap

_MAX_DIMS = 16


def distribute(
    tensor: torch.Tensor, mesh: Mesh, sbp: Placement | Sequence[Placement], src: int | None = None
) -> GlobalTensor:
    """Lay ``tensor`` (taken from global rank ``src``, default the mesh's first rank) over ``mesh``.

    Collective over the job: every rank passes a tensor of the same shape and dtype (only ``src``'s values
    are read). For ``P`` axes the ``src`` coordinate (or the first) holds the value and the others zeros.
    The result is a leaf; call ``.requires_grad_()`` to train it.
    """
    if not isinstance(tensor, torch.Tensor) or isinstance(tensor, GlobalTensor):
        raise TypeError(f"distribute needs a plain torch.Tensor, got {type(tensor).__name__}")
    dst = normalize_sbp(sbp, mesh.ndim, tensor.dim())
    src = mesh.ranks[0] if src is None else int(src)
    _, world_size = world()
    if not 0 <= src < world_size:
        raise ValueError(f"src rank {src} is out of range for a job of {world_size} ranks")
    rank, _ = world()
    holder = Mesh(mesh.device_type, (1,), names=("src",), ranks=[src])
    local = tensor.detach().to(mesh.device) if rank == src else empty_local(tensor.dtype, mesh.device)
    as_b = tuple(B if isinstance(p, _Partial) else p for p in dst)
    out = box(wrap(local, holder, (B,), tensor.shape), mesh, as_b)
    if as_b != dst and rank in mesh:
        keep = mesh.coord_of(src) if src in mesh else (0,) * mesh.ndim
        mine = mesh.coord_of(rank)
        if any(isinstance(p, _Partial) and mine[a] != keep[a] for a, p in enumerate(dst)):
            out = wrap(torch.zeros_like(out._local), mesh, dst, tensor.shape)
    return wrap(out._local, mesh, dst, tensor.shape)


def _gather_shapes(local: torch.Tensor | None, ndim: int) -> list[tuple[int, ...] | None]:
    """Every rank's local shape (None for ranks outside the mesh), by one all-gather over the job."""
    row = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.int64)
    if local is not None:
        row[0] = local.dim()
        row[1 : 1 + local.dim()] = torch.tensor(local.shape, dtype=torch.int64)
    rows = all_gather_rows(row)
    out: list[tuple[int, ...] | None] = []
    for r in rows.tolist():
        out.append(None if r[0] < 0 else tuple(int(v) for v in r[1 : 1 + r[0]]))
    return out


def _infer_shape(shapes: dict[int, tuple[int, ...]], mesh: Mesh, sbp: NdSbp) -> tuple[int, ...]:
    """Global shape whose tensor_split shards are ``shapes``: per split dim, add the distinct pieces."""
    first = shapes[mesh.ranks[0]]
    out = list(first)
    for d in range(len(first)):
        axes = [a for a, p in enumerate(sbp) if is_split(p) and p.dim == d]  # type: ignore[union-attr]
        if axes:
            coords = {tuple(mesh.coord_of(r)[a] for a in axes): shapes[r][d] for r in mesh.ranks}
            out[d] = sum(coords.values())
    return tuple(out)


def from_local(
    local: torch.Tensor,
    mesh: Mesh,
    sbp: Placement | Sequence[Placement],
    shape: Sequence[int] | None = None,
    check: bool = False,
) -> GlobalTensor:
    """Wrap this rank's shard (ignored, and may be empty, on a rank outside ``mesh``).

    Without ``shape`` the global shape is learnt from every rank's shard shape (collective over the job);
    with ``check=True`` a given shape is verified the same way. Differentiable: the gradient of the result
    flows to ``local`` in the layout's gradient layout.
    """
    if not isinstance(local, torch.Tensor) or isinstance(local, GlobalTensor):
        raise TypeError(f"from_local needs a plain torch.Tensor shard, got {type(local).__name__}")
    rank, _ = world()
    member = rank in mesh
    nd = normalize_sbp(sbp, mesh.ndim, local.dim() if member else None)
    if shape is None or check:
        gathered = _gather_shapes(local if member else None, local.dim())
        shapes = {r: s for r, s in enumerate(gathered) if s is not None and r in mesh}
        missing = [r for r in mesh.ranks if r not in shapes]
        if missing:
            raise ValueError(f"ranks {missing} of {mesh} gave no shard to from_local")
        ndims = {len(s) for s in shapes.values()}
        if len(ndims) != 1:
            raise ValueError(f"from_local shards have different numbers of dims across ranks: {shapes}")
        nd = normalize_sbp(nd, mesh.ndim, ndims.pop())
        global_shape = _infer_shape(shapes, mesh, nd) if shape is None else tuple(int(n) for n in shape)
        bad = {r: s for r, s in shapes.items() if s != local_shape(global_shape, nd, mesh.shape, mesh.coord_of(r))}
        if bad:
            expect = {r: local_shape(global_shape, nd, mesh.shape, mesh.coord_of(r)) for r in bad}
            raise ValueError(
                f"from_local shards cannot form global shape {global_shape} with sbp {format_sbp(nd)} on {mesh}: "
                f"ranks {sorted(bad)} have shapes {[bad[r] for r in sorted(bad)]}, expected "
                f"{[expect[r] for r in sorted(expect)]} (splits follow torch.tensor_split)"
            )
    else:
        global_shape = tuple(int(n) for n in shape)
        nd = normalize_sbp(nd, mesh.ndim, len(global_shape))
        if member:
            want = local_shape(global_shape, nd, mesh.shape, mesh.coord_of(rank))
            if tuple(local.shape) != want:
                raise ValueError(
                    f"from_local shard of shape {tuple(local.shape)} on rank {rank} cannot be part of global "
                    f"shape {global_shape} with sbp {format_sbp(nd)} on {mesh}: expected {want}"
                )
    if not member:
        local = empty_local(local.dtype, local.device)
    return _FromLocal.apply(local, mesh, nd, global_shape)
