"""Process groups for mesh slices (over one axis or several), created once, when a mesh is created, and
cached by rank set.

Every rank of the job creates every slice's group in the same order (``new_group`` is collective over the
job), which is why creating a mesh is collective. torch orders a group's ranks by global rank;
``GroupHandle.order`` maps that order back to the mesh's axis order.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch.distributed as dist

from shardflow.comm.init import collective_timeout, default_group
from shardflow.placement.mesh import Mesh, on_mesh_created


@dataclass(frozen=True)
class GroupHandle:
    """A process group over ``ranks`` (axis order); ``order[g]`` is the axis index of group rank ``g``."""

    ranks: tuple[int, ...]
    group: dist.ProcessGroup | None  # None: the default (world) group
    order: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.ranks)


_GROUPS: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
_OWNER: list[object] = [None]  # the default group the cached groups belong to


def _cache() -> dict[tuple[int, ...], dist.ProcessGroup | None]:
    """The cache for the current job: a process group destroyed and started again makes new groups."""
    pg = default_group()
    if pg is not _OWNER[0]:
        _GROUPS.clear()
        _OWNER[0] = pg
    return _GROUPS


def _create_groups(mesh: Mesh) -> None:
    """Build the group of every axis slice of ``mesh`` that does not exist yet (collective over the job)."""
    if not (dist.is_available() and dist.is_initialized()):
        return  # a mesh made before a job starts is a plan-only description
    world = tuple(range(dist.get_world_size()))
    groups = _cache()
    # every slice over every set of axes: one axis for boxing steps, several for buckets of gradients
    # that are partial sums over several axes (one all-reduce instead of one per axis)
    subsets = [c for k in range(1, mesh.ndim + 1) for c in itertools.combinations(range(mesh.ndim), k)]
    for axes in subsets:
        for ranks in mesh.all_slices_over(axes):
            key = tuple(sorted(ranks))
            if len(key) > 1 and key not in groups:
                groups[key] = None if key == world else dist.new_group(list(key), timeout=collective_timeout())


on_mesh_created(_create_groups)


def group_for(ranks: tuple[int, ...]) -> GroupHandle:
    """The group over ``ranks`` (a mesh axis slice; the caller must be one of them)."""
    key = tuple(sorted(ranks))
    groups = _cache()
    if key not in groups:
        raise RuntimeError(
            f"no process group for ranks {list(ranks)}: create meshes after sf.init(), on every rank of the job"
        )
    order = tuple(sorted(range(len(ranks)), key=lambda i: ranks[i]))
    return GroupHandle(ranks, groups[key], order)
