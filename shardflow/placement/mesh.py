"""``Mesh``: a named n-d grid of global ranks on one device type.

A mesh is a description (shape, axis names, ranks row-major). Creating one is collective: the layer that
owns process groups (``shardflow.comm``) registers a creation hook and builds every axis slice's group
then, on every rank in the same order. Lazy creation by members only is not safe: torch names
locally-synchronised groups by how many groups each rank already made, so ranks that made different
numbers of groups wait on different names forever.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# (rank, world size) this process prices a plan as (``acting_as``): a virtual mesh's rank, no process group
ACTING: ContextVar[tuple[int, int] | None] = ContextVar("shardflow_acting_rank", default=None)


@contextlib.contextmanager
def acting_as(rank: int, size: int) -> Iterator[None]:
    """Within this block the process answers ``world()`` as ``rank`` of ``size``: the cost model builds one
    rank's module of a virtual mesh (meta tensors, no process group) to price it."""
    token = ACTING.set((rank, size))
    try:
        yield
    finally:
        ACTING.reset(token)


def _world() -> tuple[int, int]:
    """(rank, world_size) of this process; a process without a process group is rank 0 of a world of 1."""
    acting = ACTING.get()
    if acting is not None:
        return acting
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_CREATION_HOOKS: list[Callable[[Mesh], None]] = []


def on_mesh_created(hook: Callable[[Mesh], None]) -> None:
    """Call ``hook(mesh)`` whenever a mesh is created (the comm layer builds process groups there)."""
    _CREATION_HOOKS.append(hook)


@dataclass(frozen=True, init=False)
class Mesh:
    """A grid of ranks. ``Mesh("cpu", (2, 2), names=("dp", "tp"))`` lays ranks 0..3 out row-major.
    ``virtual=True``: a description only, of any size, with no process groups (plans priced for more
    devices than the job has: ``plan.estimate``); equal to the real mesh of the same shape and ranks."""

    device_type: str
    shape: tuple[int, ...]
    names: tuple[str, ...]
    ranks: tuple[int, ...]
    virtual: bool = field(default=False, compare=False)

    def __init__(
        self,
        device_type: str,
        shape: int | Sequence[int],
        names: Sequence[str] | None = None,
        ranks: Sequence[int] | None = None,
        virtual: bool = False,
    ) -> None:
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
        shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
        if not shape_t or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in shape_t):
            raise ValueError(f"mesh shape must be a non-empty tuple of positive ints, got {shape!r}")
        size = math.prod(shape_t)
        names_t = tuple(f"d{i}" for i in range(len(shape_t))) if names is None else tuple(names)
        if len(names_t) != len(shape_t) or len(set(names_t)) != len(names_t):
            raise ValueError(
                f"mesh names {names_t!r} must be {len(shape_t)} distinct strings, one per axis of shape {shape_t}"
            )
        # Without a running process group a mesh is a pure description (planning offline, unit tests).
        real = dist.is_available() and dist.is_initialized() and not virtual
        world = dist.get_world_size() if real else None
        if ranks is None:
            if world is not None and size > world:
                raise ValueError(
                    f"mesh of shape {shape_t} needs {size} ranks but the job has {world}: "
                    f"start more processes (shardflow run -n {size}) or make the mesh smaller"
                )
            ranks_t = tuple(range(size))
        else:
            ranks_t = tuple(int(r) for r in ranks)
            if len(ranks_t) != size:
                raise ValueError(f"mesh of shape {shape_t} needs {size} ranks, got {len(ranks_t)}: {list(ranks_t)}")
            if len(set(ranks_t)) != size:
                dup = sorted({r for r in ranks_t if ranks_t.count(r) > 1})
                raise ValueError(f"mesh ranks must be distinct; {dup} appear more than once in {list(ranks_t)}")
            bad = [r for r in ranks_t if r < 0 or (world is not None and r >= world)]
            if bad:
                valid = "non-negative" if world is None else f"0..{world - 1}"
                raise ValueError(f"mesh ranks {bad} are out of range for a job of {world} ranks (valid: {valid})")
        object.__setattr__(self, "device_type", device_type)
        object.__setattr__(self, "shape", shape_t)
        object.__setattr__(self, "names", names_t)
        object.__setattr__(self, "ranks", ranks_t)
        object.__setattr__(self, "virtual", bool(virtual))
        for hook in () if virtual else _CREATION_HOOKS:
            hook(self)

    # -- geometry -------------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def __contains__(self, rank: object) -> bool:
        return rank in self.ranks

    def coord_of(self, rank: int) -> tuple[int, ...]:
        """Mesh coordinate of a global rank (ValueError if the rank is not in the mesh)."""
        try:
            flat = self.ranks.index(rank)
        except ValueError:
            raise ValueError(f"rank {rank} is not in {self}") from None
        coord = []
        for n in reversed(self.shape):
            flat, c = divmod(flat, n)
            coord.append(c)
        return tuple(reversed(coord))

    def rank_at(self, coord: Sequence[int]) -> int:
        flat = 0
        for c, n in zip(coord, self.shape):
            flat = flat * n + c
        return self.ranks[flat]

    def axis_index(self, axis: int | str) -> int:
        if isinstance(axis, str):
            if axis not in self.names:
                raise ValueError(f"mesh has no axis {axis!r}; its axes are {self.names}")
            return self.names.index(axis)
        if not 0 <= axis < self.ndim:
            raise ValueError(f"mesh axis {axis} out of range for a {self.ndim}-d mesh {self.names}")
        return axis

    def axis_slice(self, axis: int | str, rank: int) -> tuple[int, ...]:
        """The ranks that share ``rank``'s coordinates except along ``axis``, in axis order."""
        a = self.axis_index(axis)
        coord = list(self.coord_of(rank))
        out = []
        for i in range(self.shape[a]):
            coord[a] = i
            out.append(self.rank_at(coord))
        return tuple(out)

    def all_axis_slices(self, axis: int | str) -> list[tuple[int, ...]]:
        """Every slice along ``axis`` (deterministic order), e.g. to create their groups collectively."""
        a = self.axis_index(axis)
        seen: dict[tuple[int, ...], None] = {}
        for r in self.ranks:
            seen.setdefault(self.axis_slice(a, r), None)
        return list(seen)

    def slice_over(self, axes: Sequence[int], rank: int) -> tuple[int, ...]:
        """The ranks that share ``rank``'s coordinates except along ``axes``, in row-major order of those."""
        coord = list(self.coord_of(rank))
        out = []
        for sub in itertools.product(*(range(self.shape[a]) for a in axes)):
            for a, c in zip(axes, sub):
                coord[a] = c
            out.append(self.rank_at(coord))
        return tuple(out)

    def all_slices_over(self, axes: Sequence[int]) -> list[tuple[int, ...]]:
        """Every slice over ``axes`` (deterministic order), e.g. to create their groups collectively."""
        seen: dict[tuple[int, ...], None] = {}
        for r in self.ranks:
            seen.setdefault(self.slice_over(axes, r), None)
        return list(seen)

    def __getitem__(self, axis: int | str) -> Mesh:
        """The 1-d sub-mesh along ``axis`` that contains this rank."""
        a = self.axis_index(axis)
        rank, _ = _world()
        if rank not in self.ranks:
            raise ValueError(f"rank {rank} is not in {self}, so it has no sub-mesh along {self.names[a]!r}")
        ranks = self.axis_slice(a, rank)
        return Mesh(self.device_type, (self.shape[a],), names=(self.names[a],), ranks=ranks, virtual=self.virtual)

    @property
    def device(self) -> torch.device:
        """The device this rank computes on for this mesh."""
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def __repr__(self) -> str:
        axes = ", ".join(f"{n}={s}" for n, s in zip(self.names, self.shape))
        default = self.ranks == tuple(range(self.size))
        extra = ("" if default else f", ranks={list(self.ranks)}") + (", virtual" if self.virtual else "")
        return f"Mesh({self.device_type!r}, {axes}{extra})"
