"""Process groups for rank sets (mesh axis slices, whole meshes), created once and cached.

Groups are created lazily by their members only (``use_local_synchronization=True``), so a rank never
blocks on a group it does not belong to and meshes stay cheap, pure descriptions. torch orders a group's
ranks by global rank; ``GroupHandle.order`` maps that order back to the mesh's axis order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from shardflow.comm.init import DEFAULT_TIMEOUT


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
_timeout: timedelta = DEFAULT_TIMEOUT


def set_timeout(timeout: timedelta) -> None:
    """Timeout of the groups created from now on (the default group's is set by ``sf.init``)."""
    global _timeout
    _timeout = timeout


def group_for(ranks: tuple[int, ...]) -> GroupHandle:
    """The cached group over ``ranks``; the caller must be one of them."""
    key = tuple(sorted(ranks))
    if len(set(key)) != len(key):
        raise ValueError(f"a process group needs distinct ranks, got {list(ranks)}")
    if key not in _GROUPS:
        if key == tuple(range(dist.get_world_size())):
            _GROUPS[key] = None
        else:
            _GROUPS[key] = dist.new_group(list(key), timeout=_timeout, use_local_synchronization=True)
    order = tuple(sorted(range(len(ranks)), key=lambda i: ranks[i]))
    return GroupHandle(ranks, _GROUPS[key], order)


def forget_groups() -> None:
    """Drop cached groups (after ``destroy_process_group``, before a new world starts)."""
    _GROUPS.clear()
