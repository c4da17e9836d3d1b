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
from dataclasses import dataclass

import torch

from shardflow.boxing import plan_boxing
from shardflow.comm.buckets import AllReduceFlight, Bucket, Bucketer, launch_all_reduce, wait_bucket
from shardflow.comm.init import world
from shardflow.placement.sbp import grad_sbp
from shardflow.tensor.global_tensor import GlobalTensor, box, wrap
from shardflow.tensor.trace import note_boxing


@dataclass
class _Flight:
    """One bucket's all-reduce on its way, and the parameters whose gradients it carries."""

    flight: AllReduceFlight
    params: list[GlobalTensor]


class GradSync:
    """Collects gradients from post-accumulate hooks during one backward; see the module docstring."""

    def __init__(self, bucket_bytes: int = 4 * 2**20) -> None:
        self.bucket_bytes = bucket_bytes
        # keyed by (the all-reduce's ranks, dtype): one packed buffer per bucket
        self.bucketer: Bucketer[tuple[tuple[int, ...], torch.dtype], GlobalTensor] = Bucketer(bucket_bytes)
        self.flying: list[_Flight] = []

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
        full = self.bucketer.add((ranks, g.dtype), p, g._local.numel() * g._local.element_size())
        if full is not None:
            self._launch(full)

    def _launch(self, bucket: Bucket[tuple[tuple[int, ...], torch.dtype], GlobalTensor]) -> None:
        ranks, _ = bucket.key
        grads = [p.grad._local for p in bucket.items]  # type: ignore[union-attr]
        self.flying.append(_Flight(launch_all_reduce(ranks, *grads), bucket.items))

    def finish(self) -> None:
        """Start what is left, wait for every bucket and give each parameter its synchronised gradient."""
        for bucket in self.bucketer.flush():
            self._launch(bucket)
        for f in self.flying:
            for p, local in zip(f.params, wait_bucket(f.flight)):
                g = p.grad
                assert isinstance(g, GlobalTensor)
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
