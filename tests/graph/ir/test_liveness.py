"""Liveness and the memory timeline (``shardflow/graph/ir/liveness.py``) on a hand-built body.

Pins the module docstring: a storage lives from the instruction making the first variable holding it to the
last use of any variable holding it (views through ``StepIR.alias`` included), ``temp`` bytes only while
their instruction runs, a value never used dies where it is made, placed storages count only as the arena
(held whole), and ``live`` is what is left after each line once what dies there is freed. Every expected
number is worked out by hand in the comments.
"""

from __future__ import annotations

import dataclasses

from shardflow.graph.ir.instr import Box, Instr, Op, Return, Unpack
from shardflow.graph.ir.liveness import last_uses, spans, timeline
from shardflow.graph.ir.step import StepIR

TEMP_LABEL = "temporaries of the op there (its own, or a collective's staging copies)"


def _box(**fields: object) -> Box:
    """A ``Box`` from keyword fields (fields the record lacks are dropped, ones it requires get a default)."""
    names = {f.name: f for f in dataclasses.fields(Box)}
    if "route" in names and "route" not in fields:
        fields["route"] = ""
    return Box(**{k: v for k, v in fields.items() if k in names})  # type: ignore[arg-type]


def _program() -> StepIR:
    """line  instruction                       storages (bytes)
    0     v1, v2 = args                      (arguments: not the program's)
    1     v3 = f(v1)                         v3: 100 "a"
    2     v4 = view(v3)                      v4 holds v3's storage (alias)
    3     v5 = box(v2)        temp 30        v5: 40 "b"
    4     v6 = g(v4, v5)                     v6: 8 "c"
    5     v7 = h(v6)          temp 50        v7: 16 "d"
    6     v8 = unused(v6)                    v8: 2 "e", never used
    7     return v6, [v7]
    """
    ir = StepIR()
    v1, v2, v3, v4, v5, v6, v7, v8 = (ir.new_var() for _ in range(8))
    ir.emit(Unpack(names=(v1, v2), source="args"))
    ir.emit(Op(out=v3, fn="f", args=v1, used=(v1,)))
    ir.store(v3, 100, "a")
    ir.emit(Op(out=v4, fn="view", args=v3, used=(v3,)))
    ir.alias(v4, v3)
    ir.emit(_box(out=v5, src=v2, fn="box", temp=30))
    ir.store(v5, 40, "b")
    ir.emit(Op(out=v6, fn="g", args=f"{v4}, {v5}", used=(v4, v5)))
    ir.store(v6, 8, "c")
    ir.emit(Op(out=v7, fn="h", args=v6, used=(v6,), temp=50))
    ir.store(v7, 16, "d")
    ir.emit(Op(out=v8, fn="unused", args=v6, used=(v6,)))
    ir.store(v8, 2, "e")
    ir.emit(Return(loss=v6, grads=(v7,)))
    return ir


def test_last_uses() -> None:
    ir = _program()
    # a variable's last instruction among its def and uses; v8 is never used: it dies where it is made
    assert last_uses(ir.body) == {"v1": 1, "v2": 3, "v3": 2, "v4": 4, "v5": 4, "v6": 7, "v7": 7, "v8": 6}


def test_spans_follow_views_to_their_last_use() -> None:
    ir = _program()
    # v3's storage: made at 1 (v3), held by the view v4 until v4's last use at 4
    assert spans(ir.body, ir.refs, last_uses(ir.body)) == {
        "v3": (1, 4),
        "v5": (3, 4),
        "v6": (4, 7),
        "v7": (5, 7),
        "v8": (6, 6),
    }


def test_spans_skip_variables_never_defined() -> None:
    body: list[Instr] = [Unpack(names=("v1",), source="args"), Op(out="v2", fn="f", args="v1", used=("v1",))]
    # "v9" holds storage "k" but no instruction defines it: no span for it
    assert spans(body, {"v2": ["k"], "v9": ["k", "j"]}, last_uses(body)) == {"k": (1, 1)}


def test_timeline() -> None:
    ir = _program()
    memory = timeline(ir, ["v6", "v7"])
    # bytes held at each line (before its temp), then + temp:
    #   0: 0              1: a=100          2: 100           3: 100 + b=40 = 140, + temp 30 = 170
    #   4: 140 + c=8 = 148                   5: c 8 + d 16 = 24, + temp 50 = 74
    #   6: 24 + e=2 = 26  7: 24
    # peak 170 at line 3 (the box), where a, b and the box's temporaries are alive
    assert memory.peak == 170
    assert memory.peak_line == "v5 = box(v2)"
    assert memory.at_peak == [(100, "a"), (40, "b"), (30, TEMP_LABEL)]
    # after each line, what dies there freed: a and b die at 4, e at 6, c and d at 7
    #   0, 100, 100, 140, 148 - 140 = 8, 8 + 16 = 24, 24 + 2 - 2 = 24, 24 - 24 = 0
    assert memory.live == (0, 100, 100, 140, 8, 24, 24, 0)
    # the returned gradients (returned[1:]): v7's 16 bytes; the loss is not one of them
    assert memory.gradients == 16
    assert memory.arena == 0


def test_timeline_peak_moves_to_a_larger_temp() -> None:
    ir = _program()
    ir.body[5] = dataclasses.replace(ir.body[5], temp=200)  # line 5: 24 + 200 = 224 > 170
    memory = timeline(ir, ["v6", "v7"])
    assert memory.peak == 224
    assert memory.peak_line == "v7 = h(v6)"
    assert memory.at_peak == [(16, "d"), (8, "c"), (200, TEMP_LABEL)]  # the op's temp listed last
    assert memory.live == (0, 100, 100, 140, 8, 24, 24, 0)  # temps are never in ``live``


def test_timeline_with_an_arena() -> None:
    ir = _program()
    ir.placed = {"v3": 0}  # a (100 B) lives in an arena of 128 B, held from the start
    memory = timeline(ir, ["v6", "v7"], arena=128)
    # without a: 0: 128, 1: 128, 2: 128, 3: 128 + 40 + 30 = 198, 4: 128 + 48 = 176, 5: 128 + 24 + 50 = 202,
    # 6: 128 + 26 = 154, 7: 152: the peak moves to line 5
    assert memory.peak == 202
    assert memory.peak_line == "v7 = h(v6)"
    arena_label = "arena of 1 temporaries placed by lifetime (graph/arena.py)"
    assert memory.at_peak == [(128, arena_label), (16, "d"), (8, "c"), (50, TEMP_LABEL)]
    assert memory.live == (128, 128, 128, 168, 136, 152, 152, 128)
    assert memory.arena == 128
    assert memory.gradients == 16


def test_gradients_count_shared_storages_once() -> None:
    ir = _program()
    ir.alias("v9", "v7")  # a second returned gradient viewing d: its storage counts once
    ir.refs["v10"] = ["v5", "v7"]  # one holding b and d: b is added, d not again
    assert timeline(ir, ["v6", "v7", "v9", "v10"]).gradients == 16 + 40
