"""A pipeline stage's predicted memory on one rank, by walking its schedule.

Per stage: parameters, gradients (cleared at the step's start, made by the first backward, then
accumulated), optimizer state, and per micro-batch what the stage's lowered program says (the one a
tensor-parallel stage runs; a data-parallel stage's is lowered on this rank alone, for the count
only): the activations its forward hands its backward, plus the stage's outputs and received
inputs, and its backward's temporaries (the program's peak beyond what it saves). The schedule's
order of forwards and backwards is then walked (``schedule.memory_peak``): the worst moment is the
micro-batches in flight times their activations, with the gradients once they exist and a
backward's temporaries while one runs. At the end, the gradient buckets copy the gradients once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from shardflow.comm.init import world
from shardflow.runtime import split_backward as split_passes
from shardflow.runtime.memory import MemoryReport, ProgramMemory, fmt_bytes, optimizer_bytes, unique_bytes
from shardflow.runtime.schedule import memory_peak
from shardflow.runtime.stage_cut import plain
from shardflow.runtime.tensor_stage import local

if TYPE_CHECKING:
    from shardflow.runtime.pipeline import PipelineModule


def pipeline_memory(pm: PipelineModule, inputs: Sequence[Any]) -> MemoryReport:
    """This rank's report for a step on ``inputs`` (the example inputs when empty); lowers, runs nothing."""
    whole = [plain(x) for x in (inputs or pm.example_inputs)]
    first = pm._micro_batches(whole)[0][0]
    # the stage's lowered program counts it (a data-parallel stage's lowered on this rank alone,
    # for the count only): what its forward saves for its backward, and its peak beyond that
    lowered = pm._program(first).program
    held = pm._meta(first)[pm.stage - 1] if pm.stage > 0 else []
    if pm.stage < pm.stages - 1:
        held = [*held, *pm._meta(first)[pm.stage]]
    act = lowered.saved_bytes + sum(math.prod(shape) * dtype.itemsize for shape, dtype in held)
    assert lowered.memory is not None
    arena = lowered.arena.nbytes if lowered.arena is not None else 0  # held from the first step on
    temps = max(lowered.memory.peak - lowered.saved_bytes - arena, 0)
    params = unique_bytes([local(p).detach() for p in pm.params])
    grads = unique_bytes([local(p).detach() for p in pm.params if p.requires_grad])
    # a tensor-parallel stage's optimizer steps the local shards (plain tensors, no requires_grad)
    tp = pm.tp_mesh is not None
    state, temp, note = optimizer_bytes(pm.optimizer, tp) if pm.optimizer else (0, 0, "no parameters")
    buckets = unique_bytes([local(p).detach() for b in (pm.buckets, pm.partial_buckets) if b.syncs for p in b.params])
    # a tp stage's gradients are GlobalTensors, which autograd accumulates out of place (old + new)
    summing = grads if pm.tp_mesh is not None else 0
    # the last backward split in two passes holds the gradients its weights' pass reads between them
    tail = split_passes.held_between_passes(pm._program(first).traced.joint) if pm._splits else 0
    during, action, k, with_grads = memory_peak(pm.order, act, grads, temps, summing, tail, pm._splits)
    at_peak = [(k * act, f"activations kept for backward: {k} micro-batch(es) in flight x {fmt_bytes(act)}")]
    if with_grads:
        at_peak.append((grads, "gradients (accumulated over micro-batches)"))
    if during > k * act + (grads if with_grads else 0):
        at_peak.append((temps, "one backward's temporaries (its program's peak beyond what it saves)"))
        if tail and pm._splits and action == pm.order[-1]:
            at_peak.append((tail, "the last backward's gradients held between its two passes"))
        if with_grads and summing:
            at_peak.append((summing, "gradients summed out of place (GlobalTensors)"))
    where = f"stage {pm.stage}: {action!r} under {pm._pipeline.schedule}, {k} micro-batch(es) in flight"
    # a split last backward keeps its activations until its weights' pass ends, as the buckets launch
    kept = act if pm._splits and buckets else 0
    if grads + buckets + kept > during:
        at_peak, during = [(grads, "gradients"), (buckets, "gradient buckets")], grads + buckets + kept
        if kept:
            at_peak.append((kept, "the last micro-batch's activations, until its weights' pass ends"))
        where = f"stage {pm.stage}: gradient all-reduce"
    program = ProgramMemory(during, sorted(at_peak, reverse=True), grads, where)
    persistent = {"parameters": params, "optimizer state": state}
    if arena:
        persistent["arena of the stage program"] = arena
    return MemoryReport(world()[0], persistent, program, grads + temp, note)
