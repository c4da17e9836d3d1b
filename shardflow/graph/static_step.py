"""A ``ParallelModule`` step by its lowered program, the update handed to actors unit by unit.

The program (compute) hands each gradient unit on once its gradients exist and nothing later reads its
parameters; an all-reduce actor takes it once its collective is done and an optimizer actor updates just
those parameters while backward goes on (``runtime/updates.py``). With ``max_grad_norm`` the updates wait for
the global norm, as ``clip_grad_norm_``; with ``updates="after"`` the step updates once backward is over.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from shardflow.comm.buckets import bucket_done, wait_bucket
from shardflow.comm.init import world
from shardflow.graph.lower import Program
from shardflow.runtime.trace import Event
from shardflow.runtime.updates import UpdateActors
from shardflow.tensor.global_tensor import GlobalTensor

if TYPE_CHECKING:
    from shardflow.graph.parallel_module import ParallelModule


def signature(inputs: Sequence[Any]) -> Any:
    """What a program is lowered for: each input's shape, dtype and layout (non-tensors by value)."""
    return tuple((tuple(x.shape), x.dtype, x.sbp) if isinstance(x, GlobalTensor) else x for x in inputs)


def program_args(pm: ParallelModule, inputs: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """A program's arguments: what stays at one address from step to step (parameters, buffers), and the
    inputs fed each step, all as this rank's local tensors."""
    fixed: list[Any] = [p._local for p in pm.params]
    fixed += [b._local for _, b in pm.module.named_buffers() if isinstance(b, GlobalTensor)]
    return fixed, [x._local if isinstance(x, GlobalTensor) else x for x in inputs]


def static_step(pm: ParallelModule, program: Program, inputs: Sequence[Any], trace: str | None) -> float:
    """One step by ``program``: forward and backward, each unit's update where the plan puts it, and with
    ``trace`` every rank's timeline written by the first."""
    for lp in pm.local_params:
        lp.grad = None  # last step's gradients go before this step's activations arrive
    fixed, fed = program_args(pm, inputs)
    args = fixed + fed
    run = program.run if program.ran else program.checked  # the first run checks local shapes
    actors = None
    if pm.updates != "after":
        actors = UpdateActors(
            functools.partial(_reduce_unit, program),
            functools.partial(_update_unit, pm, program),
            len(program.units),
            world()[0],
            "threads" if pm.updates == "actors" else pm.updates,
            functools.partial(_collective_done, program),
        )
    marks: list[int] = []  # "after": when backward ended, for the trace

    def mark(unit: int | None, payload: Any) -> None:
        if unit is None:
            marks.append(time.time_ns())

    start = time.time_ns()
    try:
        with torch.no_grad():
            if actors is None and pm.inductor and trace is None:  # nothing to release: fewer breaks
                loss, grads = run(args)
            else:
                loss, grads = run(args, actors.ready if actors is not None else mark)
    except BaseException:
        if actors is not None:
            actors.close()
        raise
    compute_end = time.time_ns()
    if actors is not None:
        actors.finish()
    program.ran = True
    pm.input_grads = grads[len(program.grad_of) :]  # gradients of inputs it was asked for (sparse tables' pooled)
    for i, g in zip(program.grad_of, grads):
        pm.local_params[i].grad = pm._piece(i, g)
    pm._update(stepped=pm.updates != "after" and pm.max_grad_norm is None)
    if trace is not None:
        end = (actors.backward_end_ns if actors is not None else marks[0] if marks else None) or compute_end
        mine = [Event(world()[0], "compute", "forward + backward", start, end)]
        mine += actors.events if actors is not None else []
        if compute_end > end:
            mine.append(Event(world()[0], "compute", "wait for all-reduce", end, compute_end))
        pm.gather_trace(mine, trace)
    return float(loss.item())


def _collective_done(program: Program, unit: int, payload: Any) -> bool:
    """Whether unit ``unit``'s gradients can be taken without waiting (its bucket's all-reduce completed)."""
    return not program.units[unit].bucket or bucket_done(payload)


def _reduce_unit(program: Program, unit: int, payload: Any) -> list[torch.Tensor]:
    """The all-reduce actor's task: unit ``unit``'s synchronised gradients."""
    return wait_bucket(payload) if program.units[unit].bucket else list(payload)


def _update_unit(pm: ParallelModule, program: Program, unit: int, grads: Sequence[torch.Tensor]) -> None:
    """The optimizer actor's task: step just this unit's parameters (torch optimizers skip parameters
    without a gradient, so one optimizer keeps all the state); with clipping, only hold the gradients."""
    mine = []
    for k, g in zip(program.units[unit].grads, grads):
        lp = pm.local_params[program.grad_of[k]]
        lp.grad = pm._piece(program.grad_of[k], g)
        mine.append(lp)
    if pm.max_grad_norm is not None:
        return  # updates wait for the global norm (as clip_grad_norm_); the all-reduces still overlapped backward
    pm.optimizer.step()
    for lp in mine:
        lp.grad = None  # the next unit's step must not update these again
