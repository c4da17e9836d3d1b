"""Arena placement (``shardflow/graph/ir/placement.py``) on hand-built bodies.

Pins the module docstring: only ops with an ``out=`` form are placed; storages whose lifetimes do not
overlap share arena bytes and overlapping ones do not; a lifetime runs to the last use of any variable that
may hold the storage (views, and any result of boxing); inputs of asynchronous work live to the end; what
is kept (returned) or handed to a release is never placed; ``everything=False`` keeps out blocks that would
raise the peak; placed ops render ``out=_A[k]``. Offsets are worked out by hand from greedy-by-size
placement (``graph/arena.py``: largest first, each at the lowest offset free of the blocks alive with it,
64-byte aligned).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from shardflow.graph.ir.instr import Box, GatherStart, Op, OutForm, Release, Return, Unpack
from shardflow.graph.ir.liveness import timeline
from shardflow.graph.ir.placement import place
from shardflow.graph.ir.step import StepIR

F32 = torch.float32


def _make(cls: type, **fields: Any) -> Any:
    """A ``Box`` (or subclass) from keyword fields; a ``route`` the record requires gets a default."""
    names = {f.name for f in dataclasses.fields(cls)}
    if "route" in names and "route" not in fields:
        fields["route"] = ""
    return cls(**{k: v for k, v in fields.items() if k in names})


class _Body:
    def __init__(self) -> None:
        self.ir = StepIR()
        self.arg = self.ir.new_var()
        self.ir.emit(Unpack(names=(self.arg,), source="args"))

    def placeable(self, *used: str, shape: tuple[int, ...] = (4, 4)) -> str:
        """An op with an ``out=`` form making one new storage of ``shape`` (float32)."""
        out = self.ir.new_var()
        form = OutForm(overload="_out", out_names=("out",), keys=(out,), shapes=((shape, F32),))
        self.ir.emit(Op(out=out, fn="_f", args=", ".join(used or (self.arg,)), used=used or (self.arg,), out_form=form))
        self.ir.store(out, 4 * shape[0] * shape[1], "placeable")
        return out

    def plain(self, *used: str, nbytes: int = 0) -> str:
        """An op without an ``out=`` form; ``nbytes``: its new storage (0: it holds none)."""
        out = self.ir.new_var()
        self.ir.emit(Op(out=out, fn="_g", args=", ".join(used), used=used))
        if nbytes:
            self.ir.store(out, nbytes, "plain")
        return out


def _chain() -> tuple[_Body, str, str, str, str]:
    """line 1: a = f(arg), 2: b = f(a), 3: c = f(b), 4: loss = g(c), 5: return loss.
    Lifetimes: a 1-2, b 2-3, c 3-4: a and c never overlap, b overlaps both."""
    body = _Body()
    a = body.placeable()
    b = body.placeable(a)
    c = body.placeable(b)
    loss = body.plain(c, nbytes=4)
    body.ir.emit(Return(loss=loss, grads=()))
    return body, a, b, c, loss


def test_disjoint_lifetimes_share_bytes_overlapping_ones_do_not() -> None:
    body, a, b, c, loss = _chain()
    arena = place(body.ir, [loss], everything=True)
    assert arena is not None
    # a at 0; b overlaps a: 64; c overlaps b (64..128) only: fits at 0 -> 128 bytes, not 3 * 64
    assert arena.nbytes == 128
    offsets = {key: arena.blocks[j][0] for key, j in body.ir.placed.items()}
    assert offsets == {a: 0, b: 64, c: 0}
    assert all(shape == (4, 4) and dtype == F32 for _, shape, dtype in arena.blocks)
    assert [body.ir.body[i].code() for i in (1, 2, 3)] == [
        f"{a} = _out({body.arg}, out=_A[{body.ir.placed[a]}])",
        f"{b} = _out({a}, out=_A[{body.ir.placed[b]}])",
        f"{c} = _out({b}, out=_A[{body.ir.placed[c]}])",
    ]
    assert body.ir.body[4].code() == f"{loss} = _g({c})"  # no out= form: keeps allocating
    # blocks are numbered by offset: the two at 0 first
    assert sorted(body.ir.placed.values()) == [0, 1, 2] and body.ir.placed[b] == 2


def test_kept_values_are_never_placed() -> None:
    body, a, b, c, loss = _chain()
    arena = place(body.ir, [c, loss], everything=True)  # c returned
    assert arena is not None
    assert set(body.ir.placed) == {a, b}
    assert arena.nbytes == 128  # a and b overlap at line 2
    assert body.ir.body[3].code() == f"{c} = _f({b})"


def test_values_handed_to_a_release_are_never_placed() -> None:
    body, a, b, c, loss = _chain()
    body.ir.releases[2] = [Release(unit=0, payload=(b,))]
    arena = place(body.ir, [loss], everything=True)
    assert arena is not None
    assert set(body.ir.placed) == {a, c}
    assert arena.nbytes == 64  # a (1-2) and c (3-4) share their bytes
    assert body.ir.body[2].code() == f"{b} = _f({a})"


def test_a_kept_view_or_boxed_copy_keeps_its_source_out() -> None:
    for how in ("view", "box"):
        body = _Body()
        a = body.placeable()
        if how == "view":
            v = body.plain(a)
            body.ir.alias(v, a)
        else:  # boxing: its result may hold any storage of its input
            v = body.ir.new_var()
            body.ir.emit(_make(Box, out=v, src=a, fn="_box"))
        loss = body.plain(v, nbytes=4)
        body.ir.emit(Return(loss=loss, grads=()))
        kept_body = dataclasses.replace(body.ir, body=list(body.ir.body), placed={})
        assert place(kept_body, [loss, v], everything=True) is None, how
        assert kept_body.placed == {} and kept_body.body == body.ir.body
        arena = place(body.ir, [loss], everything=True)
        assert arena is not None and set(body.ir.placed) == {a}, how


def test_a_view_extends_the_lifetime_of_its_source() -> None:
    # line 1: a = f(arg), 2: v = view(a), 3: b = f(arg), 4: c = g(v, b), 5: return c
    # a lives to 4 through its view, so a and b overlap: 128 bytes (without the view's use, 64)
    body = _Body()
    a = body.placeable()
    v = body.plain(a)
    body.ir.alias(v, a)
    b = body.placeable()
    c = body.plain(v, b, nbytes=4)
    body.ir.emit(Return(loss=c, grads=()))
    arena = place(body.ir, [c], everything=True)
    assert arena is not None and arena.nbytes == 128


def test_inputs_of_asynchronous_work_live_to_the_end() -> None:
    # line 1: a = f(arg), 2: h = start(a), 3: x = finish(h), 4: b = f(arg), 5: loss = g(b), 6: return loss
    # a's storage may be held by h and x (boxing) until 3; b lives 4-5: they share bytes, unless the work
    # started at 2 is asynchronous, which may read a until the end: then they overlap
    sizes = {}
    for cls in (Box, GatherStart):
        body = _Body()
        a = body.placeable()
        h = body.ir.new_var()
        body.ir.emit(_make(cls, out=h, src=a, fn="_start"))
        x = body.ir.new_var()
        body.ir.emit(_make(Box, out=x, src=h, fn="_finish"))
        b = body.placeable()
        loss = body.plain(b, nbytes=4)
        body.ir.emit(Return(loss=loss, grads=()))
        arena = place(body.ir, [loss], everything=True)
        assert arena is not None and set(body.ir.placed) == {a, b}
        sizes[cls.__name__] = arena.nbytes
    assert sizes == {"Box": 64, "GatherStart": 128}


def _peaky() -> tuple[_Body, str, str, str, str]:
    """line  instruction              storages
    1     a = f(arg)      out=     a 64 (lives 1-2)
    2     s = g(a)                 (holds none)
    3     x = g(arg)               x 1000, no out= form (lives 3-5)
    4     b = f(x)        out=     b 64 (lives 4-5)
    5     t = g(x, b)              (holds none)
    6     c = f(s, t)     out=     c 128 (lives 6-7)
    7     loss = g(c)              loss 4 (lives 7-8)
    8     return loss
    Without an arena the peak is x + b = 1064 at line 4."""
    body = _Body()
    a = body.placeable()
    s = body.plain(a)
    x = body.plain(body.arg, nbytes=1000)
    b = body.placeable(x)
    t = body.plain(x, b)
    c = body.placeable(s, t, shape=(4, 8))
    loss = body.plain(c, nbytes=4)
    body.ir.emit(Return(loss=loss, grads=()))
    return body, a, b, c, loss


def test_only_blocks_that_do_not_raise_the_peak_are_placed() -> None:
    body, a, b, c, loss = _peaky()
    assert timeline(body.ir, [loss]).peak == 1064
    arena = place(body.ir, [loss], everything=False)
    # all three placed: an arena of 128 (c is the largest, a and b fit at its offset) + x's 1000 = 1128;
    # without c: an arena of 64 (a and b share) + x 1000 = 1064, the plain peak; without a or b too:
    # still 1064 at best. So a and b are placed, c is not
    assert arena is not None
    assert set(body.ir.placed) == {a, b}
    assert arena.nbytes == 64
    assert "out=" not in body.ir.body[6].code() and body.ir.body[6].code().startswith(f"{c} = _f(")
    assert timeline(body.ir, [loss], arena.nbytes).peak == 1064


def test_everything_places_every_placeable_block() -> None:
    body, a, b, c, loss = _peaky()
    arena = place(body.ir, [loss], everything=True)
    assert arena is not None
    assert set(body.ir.placed) == {a, b, c}
    assert arena.nbytes == 128  # c at 0 (largest first); a and b alive apart from c and each other: 0 too
    assert {arena.blocks[j][0] for j in body.ir.placed.values()} == {0}
    assert arena.blocks[body.ir.placed[c]][1:] == ((4, 8), F32)
    assert timeline(body.ir, [loss], arena.nbytes).peak == 128 + 1000  # higher than without the arena


def test_nothing_placeable_gives_no_arena() -> None:
    body = _Body()
    x = body.plain(body.arg, nbytes=64)
    body.ir.emit(Return(loss=x, grads=()))
    before = list(body.ir.body)
    assert place(body.ir, [x], everything=True) is None
    assert body.ir.body == before and body.ir.placed == {}
