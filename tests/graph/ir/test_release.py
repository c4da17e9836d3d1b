"""Release points (``shardflow/graph/ir/release.py``) on hand-built backward bodies.

Pins the module docstring: a unit (a gradient bucket as its handle, or the gradients needing no
communication that become final on one instruction) is released after the later of the instruction making
it and the last instruction reading any of its parameters or a view or copy of them (``param_alias``);
units come in release order, and ``ir.units``, ``ir.release_lines`` and ``ir.releases`` agree.
"""

from __future__ import annotations

from shardflow.graph.ir.instr import Launch, Op, Release, Unpack
from shardflow.graph.ir.release import release_units
from shardflow.graph.ir.step import StepIR, Unit, Waiting


def _op(ir: StepIR, *used: str) -> str:
    out = ir.new_var()
    ir.emit(Op(out=out, fn="f", args=", ".join(used), used=used))
    return out


def _program() -> tuple[StepIR, dict[str, str]]:
    """line  instruction            notes
    0     p0, p1, p2, x = args   p0..p2: parameters 0..2
    1     w1 = view(p1)          w1 aliases parameter 1
    2     h = f(x, p0)           last read of parameter 0
    3     ga = f(h)              a gradient
    4     gb = f(h)              a gradient
    5     gc = f(h, w1)          a gradient; reads w1: the last read of parameter 1
    6     gd = f(h)              another gradient
    7     bucket = launch(gb)
    8     t = f(p2)              last read of parameter 2
    9     ge = f(t)              a gradient
    (which parameter each gradient is of is up to each test's ``grad_of``)
    """
    ir = StepIR()
    p0, p1, p2, x = (ir.new_var() for _ in range(4))
    ir.emit(Unpack(names=(p0, p1, p2, x), source="args"))
    for i, p in enumerate((p0, p1, p2)):
        ir.param_alias[p] = frozenset({i})
    w1 = _op(ir, p1)
    ir.alias(w1, p1)
    h = _op(ir, x, p0)
    ga, gb, gc, gd = _op(ir, h), _op(ir, h), _op(ir, h, w1), _op(ir, h)
    bucket = ir.new_var()
    ir.emit(Launch(out=bucket, grads=(gb,), fn="_launch"))
    t = _op(ir, p2)
    ge = _op(ir, t)
    return ir, {"ga": ga, "gb": gb, "gc": gc, "gd": gd, "ge": ge, "bucket": bucket, "w1": w1}


def test_units_released_after_their_gradient_and_their_parameters_last_read() -> None:
    ir, v = _program()
    grad_of = [0, 1, 2, 0, 2]  # gradient k is parameter grad_of[k]'s
    grad_vars = {0: v["ga"], 1: v["gc"], 3: v["gd"], 4: v["ge"]}  # gradient 2 travels in the bucket
    release_units(ir, [Waiting(v["bucket"], (2,))], grad_vars, grad_of)
    # gradient 0: made at 3, parameter 0 last read at 2 -> 3
    # gradient 1: made at 5, parameter 1 read through its view w1 at 5 -> 5
    # gradient 3: made at 6, parameter 0 -> 6
    # gradient 4: made at 9, parameter 2 last read at 8 -> 9
    # bucket (gradient 2): launched at 7, parameter 2 last read at 8 -> 8
    assert ir.release_lines == [3, 5, 6, 8, 9]
    assert ir.units == [Unit((0,), False), Unit((1,), False), Unit((3,), False), Unit((2,), True), Unit((4,), False)]
    assert ir.releases == {
        3: [Release(unit=0, payload=(v["ga"],))],
        5: [Release(unit=1, payload=(v["gc"],))],
        6: [Release(unit=2, payload=(v["gd"],))],
        8: [Release(unit=3, payload=(v["bucket"],), bucket=True)],
        9: [Release(unit=4, payload=(v["ge"],))],
    }
    assert ir.releases[8][0].code() == f"ready(3, {v['bucket']})"
    assert ir.releases[3][0].code() == f"ready(0, ({v['ga']},))"


def test_direct_gradients_on_one_release_line_are_one_unit() -> None:
    ir, v = _program()
    # gradients 0 and 1 both read parameter 2 at line 8 (the last), so both wait for it
    grad_of = [2, 2, 1]
    grad_vars = {0: v["ga"], 1: v["gd"], 2: v["gc"]}
    release_units(ir, [], grad_vars, grad_of)
    # gradient 0: max(3, 8) = 8; gradient 1: max(6, 8) = 8; gradient 2: max(5, 5) = 5
    assert ir.release_lines == [5, 8]
    assert ir.units == [Unit((2,), False), Unit((0, 1), False)]
    assert ir.releases[8] == [Release(unit=1, payload=(v["ga"], v["gd"]))]


def test_a_bucket_is_one_unit_whatever_its_gradients() -> None:
    ir, v = _program()
    grad_of = [0, 1, 2]
    # all three gradients in one bucket (launched at 7): released after the last read of any of its
    # parameters (parameter 2 at 8), as one unit
    release_units(ir, [Waiting(v["bucket"], (0, 1, 2))], {}, grad_of)
    assert ir.units == [Unit((0, 1, 2), True)]
    assert ir.release_lines == [8]
    assert ir.releases == {8: [Release(unit=0, payload=(v["bucket"],), bucket=True)]}


def test_a_copy_of_a_parameter_keeps_its_unit_waiting() -> None:
    ir, v = _program()
    # a boxed copy of parameter 0 made at 9 and read nowhere: its definition counts as a read
    copy = ir.new_var()
    ir.emit(Op(out=copy, fn="copy", args=v["ge"], used=(v["ge"],)))
    ir.param_alias[copy] = frozenset({0})
    release_units(ir, [], {0: v["ga"]}, [0])
    assert ir.release_lines == [10]
    assert ir.units == [Unit((0,), False)]


def test_units_come_in_release_order_whatever_the_order_of_buckets() -> None:
    ir = StepIR()
    p0, p1 = ir.new_var(), ir.new_var()
    ir.emit(Unpack(names=(p0, p1), source="args"))
    ir.param_alias[p0], ir.param_alias[p1] = frozenset({0}), frozenset({1})
    g0, g1 = _op(ir), _op(ir)  # lines 1, 2
    early, late = ir.new_var(), ir.new_var()
    ir.emit(Launch(out=late, grads=(g1,), fn="_launch"))  # line 3
    ir.emit(Launch(out=early, grads=(g0,), fn="_launch"))  # line 4
    _op(ir, p1)  # line 5: parameter 1 read last here
    # the first waiting bucket (gradient 1, launched at 3) waits for parameter 1 (5); the second (4) not
    release_units(ir, [Waiting(late, (1,)), Waiting(early, (0,))], {}, [0, 1])
    assert ir.release_lines == [4, 5]
    assert ir.units == [Unit((0,), True), Unit((1,), True)]
    assert [r.payload for line in (4, 5) for r in ir.releases[line]] == [(early,), (late,)]
