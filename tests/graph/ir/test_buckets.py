"""The gradient bucket pass (``shardflow/graph/ir/buckets.py``) on hand-built backward bodies.

Pins the module docstring: partial sums wanted replicated go into all-reduce buckets, partial sums wanted
split (ZeRO-2) into reduce-scatter buckets whose fullness counts every member's piece; a bucket's launch
sits right after the instruction making the gradient that fills it, open buckets launch at the end, no
gradient is split across buckets, gradients already in their layout are final, and any other conversion
(or a "reduction" over a mesh axis of size 1) is left for after backward. Meshes here are descriptions
only: no process group is started (``placement/mesh.py``), and launches are never run.
"""

from __future__ import annotations

import functools

import torch

import shardflow as sf
from shardflow.boxing.plan import Plan
from shardflow.comm.buckets import launch_all_reduce, launch_reduce_scatter
from shardflow.graph.ir.buckets import bucket_gradients, wait_buckets
from shardflow.graph.ir.instr import Instr, Launch, Op, Unpack, Wait
from shardflow.graph.ir.step import Gradient, StepIR, Waiting
from shardflow.ops import TensorMeta
from shardflow.placement.sbp import B, P, S
from shardflow.tensor.trace import Record

F32 = torch.float32


class _Backward:
    """A body under construction: ``Unpack`` of one argument, then gradient-making and filler ops."""

    def __init__(self) -> None:
        self.ir = StepIR()
        self.arg = self.ir.new_var()
        self.ir.emit(Unpack(names=(self.arg,), source="args"))
        self.grads: list[Gradient] = []

    def grad(self, sbp: tuple, want: tuple, shape: tuple[int, ...] = (4, 4), dtype: torch.dtype = F32) -> str:
        var = self.ir.new_var()
        self.ir.emit(Op(out=var, fn="_grad", args=self.arg, used=(self.arg,)))
        self.ir.store(var, 1, f"gradient {len(self.grads)}")
        k = len(self.grads)
        self.grads.append(Gradient(k=k, var=var, sbp=sbp, meta=TensorMeta(shape, dtype), want=want))
        return var

    def filler(self) -> str:
        var = self.ir.new_var()
        self.ir.emit(Op(out=var, fn="_other", args=self.arg, used=(self.arg,)))
        return var


def _dp(n: int = 2) -> sf.Mesh:
    return sf.Mesh("cpu", (n,), names=("dp",))


def _shape(body: list[Instr]) -> list[str]:
    """The body as ``Op:<out>`` / ``Launch:<grads>`` / ``Unpack`` tokens."""
    out = []
    for ins in body:
        if isinstance(ins, Launch):
            out.append("Launch:" + ",".join(ins.grads))
        elif isinstance(ins, Op):
            out.append("Op:" + ins.out)
        else:
            out.append(type(ins).__name__)
    return out


def test_all_reduce_buckets_launch_after_the_last_of_their_gradients() -> None:
    bw = _Backward()
    g0 = bw.grad((P,), (B,))  # 4*4*4 = 64 B
    f1 = bw.filler()
    g1 = bw.grad((P,), (B,))  # 64 B: 64 + 64 = 128 >= 128 closes bucket [g0, g1]
    g2 = bw.grad((P,), (B,), shape=(8, 4))  # 128 B alone: bucket [g2]
    f2 = bw.filler()
    g3 = bw.grad((P,), (B,), shape=(2, 4))  # 32 B
    g4 = bw.grad((P,), (B,))  # 64 B: 96 < 128, left open -> launched at the end
    n_storages = len(bw.ir.storages)
    record = Record()

    out = bucket_gradients(bw.ir, bw.grads, _dp(), 0, 128, record)

    assert _shape(bw.ir.body) == [
        "Unpack",
        f"Op:{g0}",
        f"Op:{f1}",
        f"Op:{g1}",
        f"Launch:{g0},{g1}",
        f"Op:{g2}",
        f"Launch:{g2}",
        f"Op:{f2}",
        f"Op:{g3}",
        f"Op:{g4}",
        f"Launch:{g3},{g4}",
    ]
    launches = [ins for ins in bw.ir.body if isinstance(ins, Launch)]
    handles = [ins.out for ins in launches]
    assert out.waits == [Waiting(handles[0], (0, 1)), Waiting(handles[1], (2,)), Waiting(handles[2], (3, 4))]
    assert len(set(handles)) == 3 and not set(handles) & {g0, g1, g2, g3, g4, f1, f2}
    # one storage per bucket handle, as many bytes as its members on this rank
    assert len(bw.ir.storages) == n_storages + 3
    assert [bw.ir.storages[h].nbytes for h in handles] == [128, 128, 96]
    assert [bw.ir.refs[h] for h in handles] == [[h] for h in handles]
    assert [ins.comm.phase for ins in launches] == ["backward", "backward", "after"]  # type: ignore[union-attr]
    assert [ins.comm.route for ins in launches] == ["all_reduce"] * 3  # type: ignore[union-attr]
    assert [ins.comm.where for ins in launches] == [  # type: ignore[union-attr]
        "gradient bucket of 2",
        "gradient bucket of 1",
        "gradient bucket of 2",
    ]
    assert all(ins.comm.plan is None for ins in launches)  # type: ignore[union-attr]
    for ins in launches:
        fn = bw.ir.consts[ins.fn]
        assert isinstance(fn, functools.partial) and fn.func is launch_all_reduce and fn.args == ((0, 1),)
    assert [(a.ranks, a.nbytes) for a in out.all_reduces] == [((0, 1), 128), ((0, 1), 128), ((0, 1), 96)]
    assert out.final == {} and out.later == [] and out.scatter_seconds == 0
    assert [(what, how) for what, _, how in record.other] == [("gradient bucket", "one all_reduce over (dp)")] * 5


def test_a_bucket_never_splits_a_gradient() -> None:
    bw = _Backward()
    bw.grad((P,), (B,), shape=(2, 4))  # 32 B, opens a bucket
    bw.grad((P,), (B,), shape=(64, 4))  # 1024 B: crosses the 100 B limit, closes the bucket it joined
    bw.grad((P,), (B,), shape=(64, 4))  # 1024 B alone: its own bucket, whole
    out = bucket_gradients(bw.ir, bw.grads, _dp(), 0, 100, Record())
    assert [w.grads for w in out.waits] == [(0, 1), (2,)]
    assert [bw.ir.storages[w.handle].nbytes for w in out.waits] == [32 + 1024, 1024]


def test_buckets_are_per_dtype_and_open_ones_launch_in_opening_order() -> None:
    bw = _Backward()
    bw.grad((P,), (B,), dtype=torch.float16)  # 32 B half
    bw.grad((P,), (B,))  # 64 B float
    bw.grad((P,), (B,), dtype=torch.float16)  # 32 B half: 64 in the half bucket
    out = bucket_gradients(bw.ir, bw.grads, _dp(), 0, 1000, Record())  # nothing fills up
    assert [w.grads for w in out.waits] == [(0, 2), (1,)]
    tail = bw.ir.body[-2:]
    assert all(isinstance(ins, Launch) and ins.comm.phase == "after" for ins in tail)  # type: ignore[union-attr]
    assert [bw.ir.storages[w.handle].nbytes for w in out.waits] == [64, 64]


def test_gradients_already_in_their_layout_are_final() -> None:
    bw = _Backward()
    g0 = bw.grad((B,), (B,))
    g1 = bw.grad((P,), (B,))
    g2 = bw.grad((S(0),), (S(0),))
    body = list(bw.ir.body)
    n_storages = len(bw.ir.storages)
    out = bucket_gradients(bw.ir, bw.grads, _dp(), 0, 10**6, Record())
    assert out.final == {0: g0, 2: g2}
    assert [w.grads for w in out.waits] == [(1,)]
    assert bw.ir.body[:-1] == body and isinstance(bw.ir.body[-1], Launch) and bw.ir.body[-1].grads == (g1,)
    assert len(bw.ir.storages) == n_storages + 1


def test_zero2_reduce_scatter_bucket_counts_every_members_piece() -> None:
    # (P,) -> (S(0),) of a 4x4 float over 2 ranks: this rank's piece is 2x4 = 32 B; the bucket moves both
    # members' pieces, so each gradient counts 2 * 32 = 64 B towards the limit of 128: full at the second
    # (counting only this rank's pieces, 32 + 32 = 64 < 128, it would still be open)
    for rank in (0, 1):
        bw = _Backward()
        g0 = bw.grad((P,), (S(0),))
        f = bw.filler()
        g1 = bw.grad((P,), (S(0),))
        f2 = bw.filler()
        n_storages = len(bw.ir.storages)
        record = Record()
        out = bucket_gradients(bw.ir, bw.grads, _dp(), rank, 128, record)
        assert _shape(bw.ir.body) == ["Unpack", f"Op:{g0}", f"Op:{f}", f"Op:{g1}", f"Launch:{g0},{g1}", f"Op:{f2}"]
        launch = bw.ir.body[4]
        assert isinstance(launch, Launch) and launch.comm is not None
        assert (launch.comm.phase, launch.comm.route) == ("backward", "reduce_scatter")
        assert launch.comm.where == "gradient reduce-scatter bucket of 2"
        fn = bw.ir.consts[launch.fn]
        assert isinstance(fn, functools.partial) and fn.func is launch_reduce_scatter
        assert fn.args == ((0, 1), [0, 0], [(2, 2), (2, 2)], rank)
        assert out.waits == [Waiting(launch.out, (0, 1))]
        # the handle holds this rank's pieces (2 * 32 B) plus the packed pieces of both members, twice on
        # CPU gloo (a copy): 64 + 64 * 2 * 2 = 320
        assert len(bw.ir.storages) == n_storages + 1
        assert bw.ir.storages[launch.out].nbytes == 320
        assert out.all_reduces == [] and out.scatter_seconds > 0
        assert [how for _, _, how in record.other] == ["reduce_scatter, packed with others"] * 2


def test_zero2_bucket_not_full_is_launched_at_the_end() -> None:
    bw = _Backward()
    g0 = bw.grad((P,), (S(0),))  # counts 64 B
    bw.filler()
    out = bucket_gradients(bw.ir, bw.grads, _dp(), 0, 65, Record())
    last = bw.ir.body[-1]
    assert isinstance(last, Launch) and last.grads == (g0,) and last.comm is not None
    assert last.comm.phase == "after" and last.comm.route == "reduce_scatter"
    assert out.waits == [Waiting(last.out, (0,))]
    assert bw.ir.storages[last.out].nbytes == 32 + 32 * 2 * 2


def test_all_reduce_and_reduce_scatter_gradients_never_share_a_bucket() -> None:
    bw = _Backward()
    bw.grad((P,), (B,))
    bw.grad((P,), (S(0),))
    bw.grad((P,), (B,))
    out = bucket_gradients(bw.ir, bw.grads, _dp(), 0, 10**6, Record())
    comms = {ins.out: ins.comm for ins in bw.ir.body if isinstance(ins, Launch)}
    routes = {w.grads: getattr(comms[w.handle], "route", None) for w in out.waits}
    assert routes == {(0, 2): "all_reduce", (1,): "reduce_scatter"}


def test_other_conversions_and_size_one_axes_are_left_for_later() -> None:
    # a partial sum over an axis of size 1 is already the sum: no all-reduce, no reduce-scatter
    bw = _Backward()
    g0 = bw.grad((P,), (B,))
    g1 = bw.grad((P,), (S(0),))
    body, n_storages = list(bw.ir.body), len(bw.ir.storages)
    out = bucket_gradients(bw.ir, bw.grads, _dp(1), 0, 1, Record())
    assert [(c.k, c.var) for c in out.later] == [(0, g0), (1, g1)]
    assert all(isinstance(c.plan, Plan) for c in out.later)
    assert out.waits == [] and out.final == {} and bw.ir.body == body and len(bw.ir.storages) == n_storages

    # a split wanted replicated (an all-gather) is no bucket's business either
    bw = _Backward()
    g0 = bw.grad((S(0),), (B,))
    g1 = bw.grad((P,), (B,))
    out = bucket_gradients(bw.ir, bw.grads, _dp(), 0, 1, Record())
    assert [(c.k, c.var) for c in out.later] == [(0, g0)]
    assert [w.grads for w in out.waits] == [(1,)]


def test_partial_sums_over_two_axes_are_one_all_reduce_over_their_slice() -> None:
    mesh = sf.Mesh("cpu", (2, 2), names=("dp", "tp"))  # ranks row-major: rank 1 is (dp 0, tp 1)
    bw = _Backward()
    bw.grad((P, P), (B, B))  # one all-reduce over all four ranks
    bw.grad((P, B), (B, B))  # over dp only: ranks 1 and 3 for rank 1
    bw.grad((P, S(0)), (B, S(0)))  # over dp, of this rank's 2x4 piece (32 B)
    record = Record()
    out = bucket_gradients(bw.ir, bw.grads, mesh, 1, 10**6, record)
    launches = {ins.out: ins for ins in bw.ir.body if isinstance(ins, Launch)}
    by_grads = {w.grads: bw.ir.consts[launches[w.handle].fn].args for w in out.waits}
    assert by_grads == {(0,): ((0, 1, 2, 3),), (1, 2): ((1, 3),)}
    assert sorted((a.ranks, a.nbytes) for a in out.all_reduces) == [((0, 1, 2, 3), 64), ((1, 3), 64 + 32)]
    assert sorted(str(how) for _, _, how in record.other) == [
        "one all_reduce over (dp)",
        "one all_reduce over (dp)",
        "one all_reduce over (dp, tp)",
    ]


def test_wait_buckets_waits_in_launch_order() -> None:
    ir = StepIR()
    ir.emit(Unpack(names=(ir.new_var(), ir.new_var()), source="args"))  # v1, v2: the handles, say
    done = wait_buckets(ir, [Waiting("v2", (3, 0)), Waiting("v1", (1,))])
    waits = ir.body[1:]
    assert all(isinstance(w, Wait) for w in waits)
    assert [(w.handle, len(w.outs)) for w in waits] == [("v2", 2), ("v1", 1)]  # type: ignore[attr-defined]
    (a, b), (c,) = waits[0].outs, waits[1].outs  # type: ignore[attr-defined]
    assert done == {3: a, 0: b, 1: c}
    assert ir.refs[a] == ir.refs[b] == ["v2"] and ir.refs[c] == ["v1"]  # views of the bucket's buffer


def test_a_bucket_launches_after_its_last_made_gradient_even_when_an_earlier_one_fills_it() -> None:
    # the pass gets gradients in graph order of their nodes, not always of their definitions: here g1 is
    # listed first but made after g0, and g0's bytes close the bucket
    bw = _Backward()
    g0 = bw.grad((P,), (B,))  # made first
    g1 = bw.grad((P,), (B,))  # made second
    bw.grads.reverse()  # handed over as g1, then g0 (which fills the 128 B bucket)
    bucket_gradients(bw.ir, bw.grads, _dp(), 0, 128, Record())
    assert _shape(bw.ir.body) == ["Unpack", f"Op:{g0}", f"Op:{g1}", f"Launch:{g1},{g0}"]
