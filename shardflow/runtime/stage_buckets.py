"""A pipeline stage's gradient sums: its buckets over data-parallel ranks, and tied copies across stages.

Buckets are fixed up front, filled in reverse parameter order (backward produces gradients roughly so) by
the shared bucketer (``comm/buckets.py``); during the step's last backward each is launched as its last
gradient arrives. Each bucket carries one count per parameter, how many ranks had its gradient, so that a
parameter no rank used keeps no gradient, as in plain PyTorch (no decay, no optimizer state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardflow.comm.buckets import AllReduceFlight, Bucket, Bucketer, launch_all_reduce, wait_bucket
from shardflow.comm.init import collective_timeout, world
from shardflow.runtime.tensor_stage import local, local_grad, set_local_grad


@dataclass
class _Flight:
    """One bucket's all-reduce on its way, and the parameters whose gradients it carries."""

    flight: AllReduceFlight
    params: list[nn.Parameter]


class StageBuckets:
    """Gradient buckets over ``ranks`` (none when there is one), launched as their last gradient arrives."""

    def __init__(self, params: list[nn.Parameter], ranks: tuple[int, ...], bucket_bytes: int) -> None:
        self.params, self.ranks = params, ranks
        bucketer: Bucketer[None, nn.Parameter] = Bucketer(bucket_bytes)  # one group: one key
        self.members: list[Bucket[None, nn.Parameter]] = []
        for p in reversed(params):
            full = bucketer.add(None, p, p.numel() * p.element_size())
            if full is not None:
                self.members.append(full)
        self.members += bucketer.flush()
        self.of = {id(p): b for b, bucket in enumerate(self.members) for p in bucket.items}
        self.left: list[int] = []  # per bucket, gradients still to arrive (-1: launched)
        self.flying: list[_Flight] = []
        self.reset()

    @property
    def syncs(self) -> bool:
        """Whether there is anything to sum (more than one rank)."""
        return len(self.ranks) > 1

    def reset(self) -> None:
        self.left = [len(b.items) for b in self.members]
        self.flying = []

    def ready(self, p: nn.Parameter) -> None:
        b = self.of.get(id(p))
        if b is None or not self.syncs:
            return
        self.left[b] -= 1
        if self.left[b] == 0:
            self._launch(b)

    def _launch(self, b: int) -> None:
        self.left[b] = -1
        ps = self.members[b].items
        grads = [local_grad(p) if p.grad is not None else torch.zeros_like(local(p)) for p in ps]
        # one count per parameter rides along: how many ranks had a gradient for it
        used = torch.tensor([p.grad is not None for p in ps], dtype=grads[0].dtype, device=grads[0].device)
        self.flying.append(_Flight(launch_all_reduce(self.ranks, *grads, used), ps))

    def finish(self) -> None:
        if not self.syncs:
            return
        for b, left in enumerate(self.left):
            if left > 0:  # parameters this rank did not use: zeros in the sum
                self._launch(b)
        for f in self.flying:
            *grads, used = wait_bucket(f.flight)
            for p, g, count in zip(f.params, grads, used.tolist()):
                if count:
                    set_local_grad(p, g)
                else:  # no rank used it: no gradient
                    p.grad = None
        self.reset()


@dataclass
class _TiedFlight:
    """One tied parameter's gradient sum on its way; the last element counts the ranks that had one."""

    param: nn.Parameter
    flat: torch.Tensor
    work: Any


def tied_groups(
    tied: Mapping[str, Sequence[int]], stage_ranks: Sequence[tuple[int, ...]], inside: bool, virtual: bool = False
) -> dict[str, Any]:
    """For each parameter held by several stages (``tied``: name -> stages) that this rank holds, the group
    of all those stages' ranks (collective: every rank creates every group; on a ``virtual`` mesh, None)."""
    mine: dict[str, Any] = {}
    made: dict[tuple[int, ...], Any] = {}
    for name, stages in sorted(tied.items()):
        ranks = tuple(sorted(r for s in stages for r in stage_ranks[s]))
        if ranks not in made:
            made[ranks] = None if virtual else dist.new_group(list(ranks), timeout=collective_timeout())
        if inside and world()[0] in ranks:
            mine[name] = made[ranks]
    return mine


class TiedGrads:
    """Gradients of parameters held by several stages (tied embeddings), summed over all their ranks so
    that every copy takes the same update; one all-reduce per parameter, kept out of the buckets."""

    def __init__(self, groups: Mapping[str, Any]) -> None:
        self.groups = groups  # per tied parameter this rank holds, the group of every holding stage's ranks
        self.flying: list[_TiedFlight] = []

    def launch(self, named: Mapping[str, nn.Parameter]) -> None:
        for name, group in self.groups.items():
            p = named[name]
            # every data-parallel rank of every holding stage has a part of the sum, each tp rank of a
            # tensor-parallel stage a partial sum; none: no gradient, as in plain PyTorch
            g = local_grad(p).reshape(-1) if p.grad is not None else local(p).new_zeros(local(p).numel())
            flat = torch.cat([g, g.new_ones(1) if p.grad is not None else g.new_zeros(1)])
            self.flying.append(_TiedFlight(p, flat, dist.all_reduce(flat, group=group, async_op=True)))
            p.grad = None

    def finish(self) -> None:
        for f in self.flying:
            f.work.wait()
            if f.flat[-1].item():
                set_local_grad(f.param, f.flat[:-1])  # a tp stage's partial sum (P) is now the whole gradient
        self.flying = []
