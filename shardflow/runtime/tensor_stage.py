"""A tensor-parallel pipeline stage: its parameters are GlobalTensors over the stage's ``tp`` ranks and the
stage module runs on them eagerly (the op layout rules and boxing of eager mode, as for any GlobalTensor).

Inside one data-parallel row of a stage, the logical tensors are that row's micro-batch shard: the stage
module was exported for the shard's shape, so its views name shard shapes, and data parallelism stays the
pipeline's (rows cut over ``dp``, gradients summed over the ``dp`` group by local buffers). What enters the
stage is wrapped ``B`` on the row's ``tp`` mesh and what leaves it is boxed to ``B`` and unwrapped, both
differentiable, so the pipeline around it sends and receives plain tensors and calls plain ``backward``.
The optimizer steps the local shards (AdamW is element-wise, so a shard's update is the update's shard).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from shardflow.comm.init import world
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, Placement, grad_sbp
from shardflow.placement.shard import take_local
from shardflow.tensor.dispatch import implicit_broadcast, partial_sums_whole
from shardflow.tensor.global_tensor import GlobalTensor, gradients_accumulating, wrap


def shard_stage(
    module: nn.Module, named: Mapping[str, nn.Parameter], layouts: Mapping[str, Placement], mesh: Mesh
) -> dict[str, nn.Parameter]:
    """Replace each parameter of ``module`` by a GlobalTensor parameter laid out ``layouts[name]`` (default
    ``B``) over the 1-d ``mesh``, holding this rank's shard of its value; returns them by name."""
    rank = world()[0]
    out: dict[str, nn.Parameter] = {}
    new_of: dict[int, nn.Parameter] = {}
    for name, p in named.items():
        sbp = (layouts.get(name, B),)
        whole = tuple(p.shape)
        piece = take_local(p.detach(), sbp, mesh.shape, mesh.coord_of(rank)).clone()
        new = nn.Parameter(wrap(piece, mesh, sbp, whole), requires_grad=p.requires_grad)
        new._pinned = True  # type: ignore[attr-defined]  # where the strategy put it: eager ops keep it there
        new_of[id(p)] = new
        out[name] = new
    for path, p in list(module.named_parameters(remove_duplicate=False)):
        if id(p) in new_of:
            owner, _, attr = path.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, attr, new_of[id(p)])
    return out


def call_stage(module: Callable[..., Any], args: Sequence[Any], mesh: Mesh | None) -> Any:
    """Run ``module`` on plain ``args``; on a tensor-parallel stage (``mesh``) through GlobalTensors, each
    output boxed to ``B`` and returned as this rank's plain (autograd-connected) tensor."""
    if mesh is None:
        return module(*args)
    wrapped = [
        GlobalTensor.from_local(a, mesh, B, shape=tuple(a.shape)) if isinstance(a, torch.Tensor) else a for a in args
    ]
    with eager_stage(mesh):
        out = module(*wrapped)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    plain = [o.redistribute(B).to_local() if isinstance(o, GlobalTensor) else o for o in outs]
    return plain if isinstance(out, (tuple, list)) else plain[0]


@contextlib.contextmanager
def eager_stage(mesh: Mesh | None, final: bool = True) -> Iterator[None]:
    """Around a tensor-parallel stage's forward and backward: tensors the model makes itself (positions,
    masks) are the same on every rank, so they count as ``B`` beside GlobalTensors; partial sums are
    all-reduced whole (Megatron's one all-reduce per linear pair, not a reduce-scatter and an all-gather);
    and unless the backward is the step's ``final`` one, gradients accumulate as partial sums, converted
    (all-reduced over tp) once, in the last micro-batch's backward."""
    if mesh is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(implicit_broadcast())
        stack.enter_context(partial_sums_whole())
        if not final:
            stack.enter_context(gradients_accumulating())
        yield


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
