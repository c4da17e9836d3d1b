"""A tensor-parallel pipeline stage's parameters: GlobalTensors over the stage's ``tp`` ranks, each holding
this rank's shard, and the helpers that reach a shard and its gradient.

The stage itself runs as a lowered program (``graph/stage_program.py``) on these shards. Inside one
data-parallel row of a stage, the logical tensors are that row's micro-batch shard: the stage module was
exported for the shard's shape, and data parallelism stays the pipeline's (rows cut over ``dp``, gradients
summed over the ``dp`` group by local buffers). What enters and leaves the stage is replicated over ``tp``,
so the pipeline around it sends and receives plain tensors and calls plain ``backward``. The optimizer
steps the local shards (AdamW is element-wise, so a shard's update is the update's shard).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from shardflow.comm.init import world
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, Placement, grad_sbp
from shardflow.placement.shard import take_local
from shardflow.tensor.global_tensor import GlobalTensor, wrap


def shard_stage(
    module: nn.Module, named: Mapping[str, nn.Parameter], layouts: Mapping[str, Placement], mesh: Mesh
) -> dict[str, nn.Parameter]:
    """Replace each parameter of ``module`` by a GlobalTensor parameter laid out ``layouts[name]`` (default
    ``B``) over the 1-d ``mesh``, holding this rank's shard of its value; returns them by name."""
    rank = world()[0]
    out: dict[str, nn.Parameter] = {}
    new_of: dict[int, nn.Parameter] = {}
    for name, p in named.items():
        if id(p) in new_of:  # one parameter under two names: shard it once (its whole value is dropped below)
            out[name] = new_of[id(p)]
            continue
        sbp = (layouts.get(name, B),)
        whole = tuple(p.shape)
        piece = take_local(p.detach(), sbp, mesh.shape, mesh.coord_of(rank)).clone()
        new = nn.Parameter(wrap(piece, mesh, sbp, whole), requires_grad=p.requires_grad)
        new_of[id(p)] = new
        out[name] = new
        # the whole value is no longer needed, but torch.export's cut keeps references to the original
        # Parameter objects: drop their storage, or every rank would hold its stage's parameters twice
        p.data = p.data.new_empty(0)
    for path, p in list(module.named_parameters(remove_duplicate=False)):
        if id(p) in new_of:
            owner, _, attr = path.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, attr, new_of[id(p)])
    return out


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a GlobalTensor; a plain tensor as it is."""
    return t._local if isinstance(t, GlobalTensor) else t


def local_grad(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``p``'s gradient, contiguous (made so in place): eager ops may leave a
    GlobalTensor's gradient as a transposed view, and collectives read a tensor's memory in order."""
    assert p.grad is not None
    g = local(p.grad)
    if not g.is_contiguous():
        g = g.contiguous()
        set_local_grad(p, g)
    return g


def set_local_grad(p: torch.Tensor, value: torch.Tensor) -> None:
    """Make ``value`` (this rank's shard) the gradient of ``p``."""
    if isinstance(p, GlobalTensor):
        p.grad = wrap(value.view_as(p._local), p.mesh, grad_sbp(p.sbp), p.shape)
    else:
        p.grad = value.view_as(p)
