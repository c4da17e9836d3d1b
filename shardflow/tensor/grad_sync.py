"""Gradient synchronisation in buckets, overlapped with backward (DDP's reducer, for any layout).

When a leaf's gradient is accumulated in a layout other than its gradient layout, the conversion is
planned by boxing. Conversions that are one all-reduce over one mesh axis (data parallel: ``P -> B`` on
``dp``) are packed into buckets per (axis group, dtype); a full bucket starts an asynchronous all-reduce at
once, so communication runs while backward computes earlier layers. ``finish()`` flushes the last bucket,
waits, and writes the gradients back. Any other conversion (e.g. ``P -> S`` reduce-scatter) runs at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from shardflow.boxing import plan_boxing
from shardflow.comm.groups import group_for
from shardflow.comm.init import world
from shardflow.placement.sbp import grad_sbp
from shardflow.tensor.global_tensor import GlobalTensor, box, wrap
from shardflow.tensor.trace import note_boxing


@dataclass
class _Bucket:
    ranks: tuple[int, ...]
    params: list[GlobalTensor] = field(default_factory=list)
    nbytes: int = 0


class GradSync:
    """Collects gradients from post-accumulate hooks during one backward; see the module docstring."""

    def __init__(self, bucket_bytes: int = 4 * 2**20) -> None:
        self.bucket_bytes = bucket_bytes
        self.open: dict[tuple[tuple[int, ...], torch.dtype], _Bucket] = {}
        self.flying: list[tuple[Any, torch.Tensor, list[GlobalTensor]]] = []

    def add(self, p: GlobalTensor) -> None:
        g = p.grad
        assert isinstance(g, GlobalTensor)
        want = grad_sbp(p.sbp)
        plan = plan_boxing(tuple(g.shape), g.dtype, g.mesh, g.sbp, p.mesh, want)
        rank, _ = world()
        single = len(plan.steps) == 1 and plan.steps[0].kind == "all_reduce"
        if not single or rank not in p.mesh or p.mesh.shape[plan.steps[0].axis] == 1:
            p.grad = box(g, p.mesh, want)
            return
        note_boxing(plan, "gradient bucket")
        ranks = p.mesh.axis_slice(plan.steps[0].axis, rank)
        key = (ranks, g.dtype)
        bucket = self.open.setdefault(key, _Bucket(ranks))
        bucket.params.append(p)
        bucket.nbytes += g._local.numel() * g._local.element_size()
        if bucket.nbytes >= self.bucket_bytes:
            self._launch(self.open.pop(key))

    def _launch(self, bucket: _Bucket) -> None:
        flat = torch.cat([p.grad._local.reshape(-1) for p in bucket.params])  # type: ignore[union-attr]
        work = dist.all_reduce(flat, group=group_for(bucket.ranks).group, async_op=True)
        self.flying.append((work, flat, bucket.params))

    def finish(self) -> None:
        """Start what is left, wait for every bucket and give each parameter its synchronised gradient."""
        for key in list(self.open):
            self._launch(self.open.pop(key))
        for work, flat, params in self.flying:
            work.wait()
            offset = 0
            for p in params:
                g = p.grad
                assert isinstance(g, GlobalTensor)
                n = g._local.numel()
                local = flat[offset : offset + n].view_as(g._local)
                offset += n
                p.grad = wrap(local, p.mesh, grad_sbp(p.sbp), g.shape)
        self.flying.clear()


_COLLECTOR: list[GradSync | None] = [None]


def collector() -> GradSync | None:
    return _COLLECTOR[0]


@contextlib.contextmanager
def bucketed(sync: GradSync) -> Iterator[GradSync]:
    """Inside, leaves hand their gradients to ``sync`` instead of converting them one by one."""
    old, _COLLECTOR[0] = _COLLECTOR[0], sync
    try:
        yield sync
    finally:
        _COLLECTOR[0] = old
