"""A ``ParallelModule``'s predicted memory on one rank: its program's plan plus what persists and the update.

The lowered program counts activations, boxed copies, gradients and buckets line by line; here the
parameters, buffers, optimizer state and inputs are added, and the update's peak is placed where the plan
runs it (after backward, or unit by unit where the program releases each unit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from shardflow.comm.init import world
from shardflow.runtime.memory import MemoryReport, optimizer_bytes, unique_bytes, update_temporaries
from shardflow.tensor.global_tensor import GlobalTensor

if TYPE_CHECKING:
    from shardflow.graph.parallel_module import ParallelModule


def parallel_memory(pm: ParallelModule, inputs: Sequence[Any]) -> MemoryReport:
    """This rank's report for a step on ``inputs`` (the example inputs when empty); lowers, runs nothing."""
    gins = pm._inputs(inputs or pm.example_inputs)
    program = pm.program(gins)
    assert program.memory is not None
    state, temp, note = optimizer_bytes(pm.optimizer)
    persistent = {
        "parameters": unique_bytes(p._local for p in pm.params),
        "buffers": unique_bytes(b._local for b in pm.module.buffers() if isinstance(b, GlobalTensor)),
        "optimizer state": state,
        "inputs": unique_bytes(x._local for x in gins if isinstance(x, GlobalTensor)),
    }
    update = program.memory.gradients + temp + program.memory.arena  # the arena stays allocated
    if pm.updates != "after" and pm.max_grad_norm is None and program.release_lines:
        # each unit is updated where the program releases it, on top of what is alive there
        update = max(
            program.memory.live[line]
            + update_temporaries(pm.optimizer, [pm.local_params[program.grad_of[k]] for k in unit.grads])
            for unit, line in zip(program.units, program.release_lines)
        )
        note += "; each gradient unit updated during backward, where it is released"
    if any(sl is not None for sl in pm.slices):  # ZeRO-1/2: the updated pieces are all-gathered
        largest = max(p._local.nbytes for p, sl in zip(pm.params, pm.slices) if sl is not None)
        staging = largest if pm.mesh.device_type == "cpu" else 0  # gloo stages the output too
        update = max(update, program.memory.gradients + largest + staging + program.memory.arena)
    if pm.cuda_graphs or pm.inductor:  # the plan is the op-by-op program's
        note += (
            "; not modelled: "
            + ("the CUDA graph's private pool" if pm.cuda_graphs else "Inductor's own buffers")
            + " (how far above this on one H100: BENCHMARKS.md, One GPU; not measured on ranks)"
        )
    return MemoryReport(world()[0], persistent, program.memory, update, note)
