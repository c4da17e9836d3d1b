"""The ZeRO-3 prefetch pass (``shardflow/graph/ir/prefetch.py``) on a hand-built body.

Pins its docstring: the gathers of gathering op ``j + 1`` start right after op ``j``'s own gathers, from the
nearest variable of their chain that exists by then (a parameter, when the gathered value is a view made
later, whose views are then replayed on the gathered copy), and are finished where they stood; the first
gathering op's gathers, and gathers that cannot start early (a mesh axis of one rank), stay where they are.
The finished value, and any view made of it, holds the started gather's buffer, counted once.
"""

from __future__ import annotations

import torch

import shardflow as sf
from shardflow.boxing import finish_plan
from shardflow.graph.ir.instr import Box, Comm, Gather, GatherStart, Link, Op, Unpack
from shardflow.graph.ir.liveness import timeline
from shardflow.graph.ir.prefetch import prefetch
from shardflow.graph.ir.step import StepIR
from shardflow.graph.ir.verify import verify
from shardflow.graph.lower import lower, trace_step
from shardflow.ops import TensorMeta
from shardflow.placement.sbp import B, S

aten = torch.ops.aten
META = TensorMeta((4, 8), torch.float32)  # a (4, 8) float32 parameter: 128 B whole, 64 B per half
META_T = TensorMeta((8, 4), torch.float32)


def _body(dp: int) -> tuple[StepIR, sf.Mesh]:
    """w1, w2 split on dp; op 0 gathers w1, then ``t(w2)`` is made and op 1 gathers that view."""
    mesh = sf.Mesh("cpu", (dp,), names=("dp",))
    ir = StepIR()
    w1, w2, x = ir.new_var(), ir.new_var(), ir.new_var()
    ir.param_alias.update({w1: frozenset({0}), w2: frozenset({1})})
    ir.emit(Unpack(names=(w1, w2, x), source="args"))
    g1 = ir.new_var()
    comm = Comm("forward", "ZeRO-3 gather", "all_gather", None)
    ir.emit(
        Gather(
            out=g1,
            src=w1,
            fn="_box0",
            route="all_gather",
            comm=comm,
            group=0,
            phase="forward",
            chain=(Link(w1, (S(0),), META),),
        )
    )
    ir.store(g1, 128, "ZeRO-3 gather: input boxed all_gather (forward)")
    y = ir.new_var()
    ir.emit(Op(out=y, fn="_op1", args=f"{x}, {g1}", used=(x, g1), op="aten.mm.default"))
    ir.store(y, 64, "mm (forward)")
    wt = ir.new_var()
    ir.emit(Op(out=wt, fn="_op2", args=w2, used=(w2,), op="aten.t.default"))
    ir.alias(wt, w2)
    g2 = ir.new_var()
    chain = (Link(wt, (S(1),), META_T), Link(w2, (S(0),), META, ((aten.t.default, ""),)))
    ir.emit(Gather(out=g2, src=wt, fn="_box3", route="all_gather", comm=comm, group=1, phase="forward", chain=chain))
    ir.store(g2, 128, "ZeRO-3 gather: input boxed all_gather (forward)")
    ir.param_alias[g2] = frozenset({1})
    z = ir.new_var()
    ir.emit(Op(out=z, fn="_op4", args=f"{y}, {g2}", used=(y, g2), op="aten.mm.default"))
    return ir, mesh


def test_the_next_ops_gather_starts_after_this_ops_gathers_from_the_parameter() -> None:
    ir, mesh = _body(2)
    prefetch(ir, mesh, 0, 0)
    kinds = [type(ins).__name__ for ins in ir.body]
    # Unpack, Gather (op 0, stays), GatherStart (op 1's, moved up), mm, t(w2), finish, t replayed, mm
    assert kinds == ["Unpack", "Gather", "GatherStart", "Op", "Op", "Box", "Op", "Op"], kinds
    start, finish, replay = ir.body[2], ir.body[5], ir.body[6]
    assert isinstance(start, GatherStart) and isinstance(finish, Box) and isinstance(replay, Op)
    # t(w2) does not exist yet where op 0's gathers end: the parameter w2 (v2) is gathered and t replayed
    assert start.src == "v2" and start.comm is not None and start.comm.where == "ZeRO-3 gather (prefetched)"
    assert finish.src == start.out and ir.consts[finish.fn] is finish_plan
    assert ir.consts[replay.fn] is aten.t.default and replay.uses == (finish.out,)
    assert replay.out == "v7"  # the finished, replayed value keeps the name its readers use
    # the gathered buffer is the started gather's: counted once, the whole (4, 8) parameter, 128 B
    assert "v7" not in ir.storages and ir.refs["v7"] == [start.out]
    assert ir.storages[start.out].nbytes == 128
    assert ir.storages[start.out].label == "ZeRO-3 gather, prefetched (forward)"
    assert ir.param_alias[start.out] == frozenset({1})
    # gloo stages the whole output of a gather on CPU while it runs
    assert start.temp == 128


def test_a_gather_that_cannot_start_early_stays_where_it_is() -> None:
    ir, mesh = _body(1)  # an axis of one rank: nothing to gather with, nothing to start
    before = list(ir.body)
    prefetch(ir, mesh, 0, 0)
    assert ir.body == before


def test_no_gathers_no_change() -> None:
    ir = StepIR()
    a = ir.new_var()
    ir.emit(Unpack(names=(a,), source="args"))
    before = list(ir.body)
    prefetch(ir, sf.Mesh("cpu", (2,), names=("dp",)), 0, 0)
    assert ir.body == before


def test_views_of_a_prefetched_gather_hold_the_started_gathers_buffer() -> None:
    # the layout pass may make a view of the gathered value (expand, slice, ...) before prefetch runs; once
    # the gather is started early, that view holds the handle's buffer, not a storage that no longer exists
    ir, mesh = _body(2)
    view = ir.new_var()
    ir.emit(Op(out=view, fn="_op5", args="v7", used=("v7",), op="aten.expand.default"))
    ir.alias(view, "v7")
    prefetch(ir, mesh, 0, 0)
    start = next(ins for ins in ir.body if isinstance(ins, GatherStart))
    assert ir.refs[view] == [start.out] == ir.refs["v7"]
    verify(ir, "prefetch")
    assert timeline(ir, [""]).peak > 0


class _SlicedPosition(torch.nn.Module):
    """``x @ w + pos[:4]``: the slice of a ZeRO-3 parameter is a view of its gathered copy."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8))
        self.pos = torch.nn.Parameter(torch.randn(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.w + self.pos[:4]).sum()


def test_lowering_a_slice_of_a_prefetched_parameter() -> None:
    model, x = _SlicedPosition(), torch.randn(4, 8)
    joint = trace_step(model, (x,), "cpu")
    mesh = sf.Mesh("cpu", (2,), names=("dp",))
    for rank in (0, 1):
        program = lower(joint, mesh, rank, [(S(0),), (S(0),), (B,)], zero_axis=0)
        assert program.ir is not None and any(isinstance(ins, GatherStart) for ins in program.ir.body)
