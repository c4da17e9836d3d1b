"""Code generation (``shardflow/graph/ir/codegen.py``) of small hand-built programs.

Pins the module docstring: one line per instruction (releases in place as ``ready`` calls), each variable
deleted right after its last use but never after ``return``; the checked variant asserts every op's local
shape (``_check``) and that placed ops wrote into their arena blocks; ``build`` gives runnable functions
whose results equal plain torch; a stage becomes a forward ``step`` and a ``backward``.
"""

from __future__ import annotations

import pytest
import torch

from shardflow.graph.ir.codegen import build, source
from shardflow.graph.ir.instr import Box, Op, OutForm, Release, Return, Unpack
from shardflow.graph.ir.placement import place
from shardflow.graph.ir.step import StepIR
from shardflow.graph.ir.verify import verify

aten = torch.ops.aten
F32 = torch.float32


def _program(mm_shape: tuple[int, int] = (2, 2), placeable: bool = False) -> StepIR:
    """v1, v2 = args; v3 = mm(v1, v2); v4 = relu(v3); [ready(0, (v4,))]; v5 = sum(v3); v6 = neg(v4) (never
    used); return v5, [v4]. ``mm_shape``: the local shape the checked program asserts for v3."""
    ir = StepIR()
    v1, v2, v3, v4, v5, v6 = (ir.new_var() for _ in range(6))
    ir.emit(Unpack(names=(v1, v2), source="args"))
    mm = ir.const(aten.mm.default, "op")
    form = None
    if placeable:
        form = OutForm(overload=ir.const(aten.mm.out, "out"), out_names=("out",), keys=(v3,), shapes=(((2, 2), F32),))
    ir.emit(
        Op(out=v3, fn=mm, args=f"{v1}, {v2}", used=(v1, v2), op="aten.mm", checks=((None, mm_shape),), out_form=form)
    )
    ir.store(v3, 16, "mm")
    ir.emit(Op(out=v4, fn=ir.const(aten.relu.default, "op"), args=v3, used=(v3,), op="aten.relu"))
    ir.store(v4, 16, "relu")
    ir.releases[2] = [Release(unit=0, payload=(v4,))]
    ir.emit(Op(out=v5, fn=ir.const(aten.sum.default, "op"), args=v3, used=(v3,), op="aten.sum"))
    ir.store(v5, 4, "sum")
    ir.emit(Op(out=v6, fn=ir.const(aten.neg.default, "op"), args=v4, used=(v4,), op="aten.neg"))
    ir.store(v6, 16, "neg")
    ir.emit(Return(loss=v5, grads=(v4,)))
    return ir


FAST = """\
def step(args, ready=_skip):
    v1, v2 = args
    v3 = _op0(v1, v2)
    del v1, v2
    v4 = _op1(v3)
    ready(0, (v4,))
    v5 = _op2(v3)
    del v3
    v6 = _op3(v4)
    del v6
    return v5, [v4]
"""


def test_source_deletes_each_variable_after_its_last_use_not_after_return() -> None:
    assert source(_program(), None, checked=False) == FAST


def test_checked_source_asserts_local_shapes() -> None:
    text = source(_program(), None, checked=True)
    lines = text.splitlines()
    at = lines.index("    v3 = _op0(v1, v2)")
    assert lines[at + 1] == "    _check(v3, (2, 2), 'aten.mm')"
    assert text.count("_check(") == 1  # only ops with checks get one
    assert [ln for ln in lines if not ln.strip().startswith("_check(")] == FAST.splitlines()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, generator=g), torch.randn(3, 2, generator=g)


def test_build_gives_a_runnable_step_equal_to_torch() -> None:
    ir = _program()
    code = build(ir, None)
    fast_source, fast, checked = code.source, code.fast, code.checked
    assert fast_source == FAST
    a, b = _inputs()
    calls: list[tuple[object, object]] = []
    for step in (fast["step"], checked["step"]):
        calls.clear()
        loss, grads = step([a, b], lambda unit, payload: calls.append((unit, payload)))
        torch.testing.assert_close(loss, (a @ b).sum(), rtol=1e-6, atol=1e-6)
        assert len(grads) == 1
        torch.testing.assert_close(grads[0], torch.relu(a @ b), rtol=1e-6, atol=1e-6)
        assert len(calls) == 1 and calls[0][0] == 0
        payload = calls[0][1]
        assert isinstance(payload, tuple) and len(payload) == 1 and payload[0] is grads[0]  # handed on, then returned
    loss, _ = fast["step"]([a, b])  # ``ready`` defaults to a no-op
    torch.testing.assert_close(loss, (a @ b).sum(), rtol=1e-6, atol=1e-6)


def test_checked_step_catches_a_wrong_local_shape() -> None:
    code = build(_program(mm_shape=(3, 3)), None)
    fast, checked = code.fast, code.checked
    a, b = _inputs()
    fast["step"]([a, b])  # the fast program asserts nothing
    with pytest.raises(
        AssertionError, match=r"layout rule bug: aten.mm gave a local of shape \(2, 2\), expected \(3, 3\)"
    ):
        checked["step"]([a, b])


def test_placed_op_writes_into_its_arena_block() -> None:
    ir = _program(placeable=True)
    arena = place(ir, ["v5", "v4"], everything=True)
    assert arena is not None and ir.placed == {"v3": 0}
    code = build(ir, arena)
    fast_source, fast, checked = code.source, code.fast, code.checked
    lines = fast_source.splitlines()
    assert lines[1] == "    if not _A: _fill(args)"
    assert "    v3 = _out1(v1, v2, out=_A[0])" in lines
    assert "_placed(v3, _A[0], 'aten.mm')" in source(ir, arena, checked=True)
    a, b = _inputs()
    for step in (checked["step"], fast["step"], checked["step"]):
        loss, grads = step([a, b])
        torch.testing.assert_close(loss, (a @ b).sum(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads[0], torch.relu(a @ b), rtol=1e-6, atol=1e-6)
    assert arena.buffer is not None and arena.views[0].data_ptr() == arena.buffer.data_ptr()
    torch.testing.assert_close(arena.views[0], a @ b, rtol=1e-6, atol=1e-6)  # the last run's mm is there


def test_a_stage_is_a_forward_and_a_backward() -> None:
    # forward: v3 = mm(v1, v2), v4 = relu(v3), its output; backward: v6 = mul(v5, v3) of the arriving v5
    ir = StepIR()
    v1, v2, v3, v4, v5, v6 = (ir.new_var() for _ in range(6))
    ir.emit(Unpack(names=(v1, v2), source="args"))
    ir.emit(Op(out=v3, fn=ir.const(aten.mm.default, "op"), args=f"{v1}, {v2}", used=(v1, v2)))
    ir.emit(Op(out=v4, fn=ir.const(aten.relu.default, "op"), args=v3, used=(v3,)))
    ir.stage_outputs = (v4,)
    ir.emit(Unpack(names=(v5,), source="grads_in"))
    ir.emit(Op(out=v6, fn=ir.const(aten.mul.Tensor, "op"), args=f"{v5}, {v3}", used=(v5, v3)))
    ir.emit(Return(loss=None, grads=(v6,)))
    code = build(ir, None)
    text, fast = code.source, code.fast
    assert text == (
        "def step(args, ready=_skip):\n"
        "    v1, v2 = args\n"
        "    v3 = _op0(v1, v2)\n"
        "    del v1, v2\n"
        "    v4 = _op1(v3)\n"
        "    return [v4], (v3,)\n"
        "def backward(saved, grads_in, ready=_skip):\n"
        "    (v3,) = saved\n"
        "    v5, = grads_in\n"
        "    v6 = _op2(v5, v3)\n"
        "    del v3, v5\n"
        "    return [v6], []\n"
    )
    a, b = _inputs()
    g = torch.ones(2, 2)
    outs, saved = fast["step"]([a, b])
    torch.testing.assert_close(outs[0], torch.relu(a @ b), rtol=1e-6, atol=1e-6)
    grads, input_grads = fast["backward"](saved, [g])
    torch.testing.assert_close(grads[0], g * (a @ b), rtol=1e-6, atol=1e-6)
    assert input_grads == []


def test_a_constant_read_like_a_variable_is_never_deleted() -> None:
    # a tensor the trace holds as an attribute (a causal mask buffer) is a constant: a Box may read it as its
    # source, and the generated code must keep it a global (a ``del`` would make it a local, unbound)
    ir = StepIR()
    x = ir.new_var()
    ir.emit(Unpack(names=(x,), source="args"))
    mask = ir.const(torch.ones(2), "attr")
    boxed = ir.new_var()
    ir.emit(Box(out=boxed, src=mask, fn=ir.const(lambda t: t * 2, "box")))
    ir.store(boxed, 8, "boxed mask")
    total = ir.new_var()
    ir.emit(Op(out=total, fn=ir.const(torch.add, "op"), args=f"{x}, {boxed}", used=(x, boxed)))
    ir.store(total, 8, "sum")
    ir.emit(Return(loss=total, grads=()))
    verify(ir, "a hand-built program")
    code = build(ir, None)
    assert f"del {mask}" not in code.source and mask not in " ".join(
        line for line in code.source.splitlines() if line.strip().startswith("del")
    )
    loss, grads = code.fast["step"]([torch.zeros(2)])
    torch.testing.assert_close(loss, torch.full((2,), 2.0))
    assert grads == []
