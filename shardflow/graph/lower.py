"""Lower a training step to a static per-rank program: the plan's layouts and the traced joint graph
(graph/joint.py) through the IR passes (graph/ir/) to generated code.

The passes, in order, each a module of its own:

============================  ======================================================================
``ir/layouts.py``             layouts and boxing: every op's signature (``ir/op_call.py``), a ``Box`` where
                              layouts differ, priced one step ahead (``ir/lookahead.py``)
``ir/gathers.py``             (in the layout pass) ZeRO-3: a ``Gather`` of each split parameter at each use
``ir/prefetch.py``            ZeRO-3: each gather started while the op before it computes
``ir/buckets.py``             gradient buckets launched as their last gradient is made; waits after backward
``LayoutPass.finish``         (the layout pass's epilogue) the loss replicated, a stage's input gradients,
                              gradients converted once backward ends
``ir/release.py``             where each update unit may be handed to the update actors
``ir/placement.py``           arena placement of temporaries by lifetime (``arena=True`` or ``"all"``)
``ir/liveness.py``            the memory timeline: bytes alive at every instruction, the peak
``ir/codegen.py``             one Python function (a stage: two), ``exec``-ed once
============================  ======================================================================

``ir/verify.py`` checks the IR's invariants after each pass.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from shardflow.boxing import DEFAULT_COST
from shardflow.graph.flops import joint_flops, program_flops
from shardflow.graph.ir.buckets import bucket_gradients, wait_buckets
from shardflow.graph.ir.codegen import build
from shardflow.graph.ir.instr import Release, Return
from shardflow.graph.ir.layouts import LayoutPass
from shardflow.graph.ir.liveness import saved, saved_bytes, timeline
from shardflow.graph.ir.placement import place
from shardflow.graph.ir.prefetch import prefetch
from shardflow.graph.ir.release import release_units
from shardflow.graph.ir.verify import verify
from shardflow.graph.joint import Joint, trace_step
from shardflow.graph.program import Program
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import NdSbp

__all__ = ["Joint", "Program", "lower", "lower_ir", "trace_step"]


def lower_ir(
    joint: Joint,
    mesh: Mesh,
    rank: int,
    sbps: Sequence[NdSbp | None],
    bucket_bytes: int,
    reduce_to_split: bool,
    zero_axis: int | None = None,
    grad_sbps: Sequence[NdSbp | None] = (),
    arena: bool | str = False,
    values: Mapping[str, NdSbp] | None = None,
    gathered: Collection[int] | None = None,
) -> Program:
    """One policy's program: the passes of the module docstring, in order, the IR verified after each."""
    if zero_axis is not None and joint.n_grads_in:
        raise AssertionError("ZeRO-3 gathers in a pipeline stage: prefetch would carry a handle across the cut")
    lp = LayoutPass(joint, mesh, rank, sbps, reduce_to_split, zero_axis, grad_sbps, values, gathered, bool(arena))
    traversed = lp.run()
    ir = lp.ir
    verify(ir, "the layout pass")
    if zero_axis is not None:
        prefetch(ir, mesh, rank, zero_axis)
        verify(ir, "prefetch")
    buckets = bucket_gradients(ir, lp.gradients, mesh, rank, bucket_bytes, lp.record)
    verify(ir, "gradient buckets")
    ends = lp.finish(traversed, buckets.later)
    grad_vars = {**buckets.final, **ends.converted}
    release_units(ir, buckets.waits, grad_vars, joint.grad_of)
    ir.emit(Release(unit=None))  # backward is over: what follows waits for communication
    grad_vars |= wait_buckets(ir, buckets.waits)
    grads = tuple(grad_vars[k] for k in range(len(joint.grad_of)))
    ir.emit(Return(loss=ends.loss, grads=grads, input_grads=ends.input_grads))
    verify(ir, "release points and waits")
    if joint.n_grads_in:
        kept = [*grads, *ends.input_grads, *ir.stage_outputs, *saved(ir)]
        returned = ["", *grads]
    else:
        kept = returned = [ends.loss or "", *grads, *ends.input_grads]
    placed, memory = None, timeline(ir, returned)
    if arena:
        body = list(ir.body)
        placed = place(ir, kept, everything=arena == "all")
        if placed is not None:
            with_arena = timeline(ir, returned, placed.nbytes)
            # ``select`` judges by an estimate (lifetimes through boxing counted long, the arena as its densest
            # line): placement that still raises the peak is undone for ``arena=True``
            if arena is True and with_arena.peak > memory.peak:
                ir.body[:], ir.placed, placed = body, {}, None
            else:
                memory = with_arena
        verify(ir, "arena placement")
    code = build(ir, placed)
    collectives = [ins.comm for ins in ir.body if ins.comm is not None]
    cost = sum(c.plan.seconds for c in collectives if c.plan is not None) + buckets.scatter_seconds
    for bucket in buckets.all_reduces:
        cost += DEFAULT_COST.collective("all_reduce", len(bucket.ranks), bucket.nbytes)
    return Program(
        code.source,
        code.fast["step"],
        code.checked["step"],
        lp.record,
        joint.grad_of,
        collectives,
        cost,
        memory,
        units=list(ir.units),
        release_lines=list(ir.release_lines),
        backward=code.fast.get("backward"),
        checked_backward=code.checked.get("backward"),
        saved_bytes=saved_bytes(ir),
        arena=placed,
        ir=ir,
    )


def lower(
    joint: Joint,
    mesh: Mesh,
    rank: int,
    sbps: Sequence[NdSbp | None],
    bucket_bytes: int = 4 * 2**20,
    zero_axis: int | None = None,
    grad_sbps: Sequence[NdSbp | None] = (),
    arena: bool | str = False,
    values: Mapping[str, NdSbp] | None = None,
    gathered: Collection[int] | None = None,
) -> Program:
    """This rank's program for ``joint`` with one layout per placeholder (params, buffers, inputs).

    Op-by-op choices cannot see what a layout costs later, in backward: reduce-scattering partial sums
    into a batch split looks cheaper than an all-reduce in forward, then costs all-to-alls, gathers and
    reduced gradients of replicated parameters in backward. So the passes run under two policies (partial
    sums may be reduce-scattered into splits, or only reduced to ``B``) and the program whose
    communication the cost model prices lower wins (ties: the first). Every rank makes the same choice:
    costs come from layouts and shapes only. ``grad_sbps`` (per parameter, None: the default) asks for
    gradients in another layout than their parameter's (ZeRO-2: split on the data-parallel axis).
    ``arena``: static placement of the program's temporaries (graph/arena.py): True where it does not
    raise the peak, ``"all"`` every one that can be placed. ``values``: layouts the plan fixes for forward
    values by key (``value_keys``); each is boxed there right after the op that makes it. ``gathered``: the
    parameters (by index) stored split on ``zero_axis`` and gathered for each use (default: every one split there).
    """
    programs = [
        lower_ir(joint, mesh, rank, sbps, bucket_bytes, policy, zero_axis, grad_sbps, arena, values, gathered)
        for policy in (True, False)
    ]
    chosen = min(programs, key=lambda p: p.cost)
    assert chosen.ir is not None
    chosen.flops = joint_flops(joint).with_rank(program_flops(chosen.ir))  # counted once, for the program kept
    return chosen
