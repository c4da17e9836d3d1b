"""Global-norm gradient clipping on shards, as ``torch.nn.utils.clip_grad_norm_`` on the serial model.

Every runner computes its shards' squared norms, weighs each by how many ranks hold the same piece (so a
piece counts once), sums over the groups that hold different pieces, and scales its own gradients. Only the
weighing differs between a compiled step (by layout) and a pipeline stage (by owning stage); it is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardflow.comm.groups import group_for
from shardflow.comm.init import world
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, NdSbp


def squared_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each gradient's squared norm in float64 (one ``_foreach_norm``); a single 0 when there are none."""
    if not grads:
        return torch.zeros(1, dtype=torch.float64)
    return torch.stack(torch._foreach_norm([g.detach() for g in grads])).double().square()


def clip_by_total(total: torch.Tensor, groups: Sequence[Any], grads: Sequence[torch.Tensor], max_norm: float) -> float:
    """Sum this rank's squared-norm ``total`` over ``groups``, then scale ``grads`` so that the global norm
    is at most ``max_norm``; returns the global norm."""
    for group in groups:
        dist.all_reduce(total, group=group)
    norm = float(total.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0 and grads:
        torch._foreach_mul_(list(grads), coef)
    return norm


def clip_grad_norm(sbps: Sequence[NdSbp], local_params: Sequence[nn.Parameter], mesh: Mesh, max_norm: float) -> float:
    """``clip_grad_norm_`` over the logical gradients of parameters laid out as ``sbps`` on ``mesh``.

    Each shard's squared norm is summed over the mesh axes on which some gradient is split; a shard held by
    several ranks of those axes (``B`` there) counts once. Axes on which every gradient is ``B`` need no
    communication: every rank already has the same sum there.
    """
    pairs = [(sbp, lp.grad) for sbp, lp in zip(sbps, local_params) if lp.grad is not None]
    if not pairs:
        return 0.0
    sbps = [sbp for sbp, _ in pairs]
    axes = [a for a in range(mesh.ndim) if mesh.shape[a] > 1 and any(s[a] != B for s in sbps)]
    squares = squared_norms([g for _, g in pairs])
    weights = [1.0 / math.prod(mesh.shape[a] for a in axes if s[a] == B) for s in sbps]
    total = (squares * torch.tensor(weights, dtype=torch.float64, device=squares.device)).sum()
    rank = world()[0]
    groups = [group_for(mesh.axis_slice(axis, rank)).group for axis in axes]
    return clip_by_total(total, groups, [g for _, g in pairs], max_norm)
