"""Gradient buckets: which gradients travel together, and the packed collective that moves them.

One bucketer serves every gradient path: the compiled step decides its buckets while lowering, pipeline
stages and eager GlobalTensor sync fill theirs as backward hands gradients over. A bucket per key (process
group, dtype, kind) fills in arrival order and is full once its bytes reach the limit (DDP's reducer: the
first gradient that crosses the limit closes the bucket, so no gradient is split across two).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist

from shardflow.comm.collectives import ReduceScattering, reduce_scatter_finish, reduce_scatter_start
from shardflow.comm.groups import group_for

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass
class Bucket(Generic[K, T]):
    """Items (gradients, parameters or their indices) that one collective will move; ``key`` says how."""

    key: K
    items: list[T] = field(default_factory=list)
    nbytes: int = 0


class Bucketer(Generic[K, T]):
    """Buckets per key, filled in arrival order; ``add`` returns a bucket the moment it is full."""

    def __init__(self, bucket_bytes: int) -> None:
        self.bucket_bytes = bucket_bytes
        self.open: dict[K, Bucket[K, T]] = {}

    def add(self, key: K, item: T, nbytes: int, weight: int = 1) -> Bucket[K, T] | None:
        """Put ``item`` (``nbytes`` on this rank) in the bucket of ``key``; the bucket if that filled it.
        ``weight``: how many times its bytes count towards the limit (a reduce-scatter moves every
        member's piece)."""
        bucket = self.open.setdefault(key, Bucket(key))
        bucket.items.append(item)
        bucket.nbytes += nbytes
        if bucket.nbytes * weight >= self.bucket_bytes:
            return self.open.pop(key)
        return None

    def flush(self) -> list[Bucket[K, T]]:
        """The buckets not yet full, in the order they were opened; the bucketer is empty afterwards."""
        out = list(self.open.values())
        self.open.clear()
        return out


@dataclass
class AllReduceFlight:
    """One bucket's packed all-reduce on its way (``wait_bucket`` waits and unpacks it)."""

    work: Any
    flat: torch.Tensor
    shapes: list[torch.Size]


def launch_all_reduce(ranks: tuple[int, ...], *grads: torch.Tensor) -> AllReduceFlight:
    """Pack ``grads`` into one buffer and start summing it over ``ranks`` asynchronously."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    work = dist.all_reduce(flat, group=group_for(ranks).group, async_op=True)
    return AllReduceFlight(work, flat, [g.shape for g in grads])


def launch_reduce_scatter(
    ranks: tuple[int, ...], dims: Sequence[int], sizes: Sequence[Sequence[int]], me: int, *grads: torch.Tensor
) -> ReduceScattering:
    """Start one reduce-scatter of ``grads`` over ``ranks``, keeping member ``me``'s piece (ZeRO-2)."""
    return reduce_scatter_start(grads, dims, sizes, me, group_for(ranks))


def bucket_done(flight: AllReduceFlight | ReduceScattering) -> bool:
    """Whether a bucket's collective has completed (``wait_bucket`` would not block)."""
    return bool(flight.work.is_completed())


def wait_bucket(flight: AllReduceFlight | ReduceScattering) -> list[torch.Tensor]:
    """A bucket's synchronised gradients (all-reduced, or this rank's reduce-scattered pieces)."""
    if isinstance(flight, ReduceScattering):
        return reduce_scatter_finish(flight)
    flight.work.wait()
    out, offset = [], 0
    for shape in flight.shapes:
        n = math.prod(shape)
        out.append(flight.flat[offset : offset + n].view(shape))
        offset += n
    return out
