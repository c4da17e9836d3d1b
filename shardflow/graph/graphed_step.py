"""A ``ParallelModule`` step on one GPU replayed as its program's CUDA graph (``runtime/cuda_graph.py``).

The graph holds forward, backward, clipping and, where the optimizer can be captured, the update; what it
reads by address is fingerprinted each step so that a changed tensor or setting captures anew.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from shardflow.comm.init import world
from shardflow.graph.lower import Program
from shardflow.graph.static_step import program_args, signature
from shardflow.runtime.cuda_graph import GraphedStep, check_graphable, fingerprint, make_capturable
from shardflow.runtime.trace import Event

if TYPE_CHECKING:
    from shardflow.graph.parallel_module import ParallelModule


def graphed_step(pm: ParallelModule, program: Program, inputs: Sequence[Any], trace: str | None) -> float:
    """The step replayed as ``program``'s CUDA graph, captured after warm-up."""
    check_graphable(pm.mesh, pm.zero)
    start = time.time_ns()
    key = signature(inputs)
    graphed = pm.graphs.get(key)
    if graphed is None or graphed.owner is not program:  # new, or the programs were lowered anew
        body = functools.partial(_graph_body, pm, program)
        graphed = pm.graphs[key] = GraphedStep(body, safe=not pm.inductor, owner=program)
    fixed, fed = program_args(pm, inputs)
    # what the graph reads by address or bakes in: tensors, optimizer state and settings, the clip norm
    state = (fingerprint(fixed, pm.optimizer), id(pm.optimizer), pm.max_grad_norm)
    if state != graphed.key:  # new or replaced optimizer state may need its step counts on the device
        pm.graph_update = make_capturable(pm.optimizer)
        state = (fingerprint(fixed, pm.optimizer), *state[1:])
    with torch.no_grad():
        loss, grads = graphed(fixed, fed, state)
    for i, g in grads:  # this graph's gradients (another graph, or zero_grad, may have set others)
        pm.local_params[i].grad = g
    if not pm.graph_update:  # an update the graph could not hold runs after it, on its gradients
        pm.optimizer.step()
    pm.steps += 1
    value = float(loss.item())
    if trace is not None:
        what = {"eager": "step (warm-up, op by op)", "capture": "step (captured, then replayed)"}
        name = what.get(graphed.last, "step (CUDA graph replay)")
        pm.gather_trace([Event(world()[0], "compute", name, start, time.time_ns())], trace)
    return value


def _graph_body(
    pm: ParallelModule, program: Program, args: list[Any]
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """A step's device work, with no host reads, as the graph captures it: forward and backward,
    gradients handed to the optimizer, clipping, and the update where the optimizer can be captured;
    returns the loss and each parameter's gradient (the graph's outputs)."""
    for lp in pm.local_params:
        lp.grad = None  # the last step's gradients go before this step's activations arrive
    run = program.run if program.ran else program.checked
    loss, grads = run(args)
    program.ran = True
    out = list(zip(program.grad_of, grads))
    for i, g in out:
        pm.local_params[i].grad = g
    if pm.max_grad_norm is not None:  # one device: torch's own clipping, which reads nothing back
        torch.nn.utils.clip_grad_norm_(pm.local_params, pm.max_grad_norm)
    if pm.graph_update:
        pm.optimizer.step()
    return loss, out
