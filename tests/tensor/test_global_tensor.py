"""GlobalTensor on real ranks: construction, shape inference, ranks outside the mesh, autograd into
locals, optimizers, DTensor conversion, and the errors users meet first."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import shardflow as sf
from shardflow.testing import run_on_ranks


def _expect_error(fn, exc, text):
    try:
        fn()
    except exc as e:
        assert text in str(e), f"message {str(e)!r} lacks {text!r}"
        return
    raise AssertionError(f"no {exc.__name__} raised")


def _from_local_infers_uneven_shape_and_backprops():
    rank = dist.get_rank()
    mesh = sf.Mesh("cpu", (4,))
    full = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    local = full.tensor_split(4)[rank].clone().requires_grad_()  # 3, 3, 2, 2 rows
    x = sf.GlobalTensor.from_local(local, mesh, sf.S(0))
    assert tuple(x.shape) == (10, 3) and x.sbp == (sf.S(0),)
    torch.testing.assert_close(x.full(), full)
    w = torch.linspace(-1, 1, 30).reshape(10, 3)
    (x.full() * w).sum().backward()
    torch.testing.assert_close(local.grad, w.tensor_split(4)[rank])
    # nested splits on a 2x2 mesh: (S(1), S(1)) splits dim 1 by axis 0, then each piece by axis 1
    m22 = sf.Mesh("cpu", (2, 2))
    wide = torch.arange(2 * 7, dtype=torch.float32).reshape(2, 7)
    a, b = m22.coord_of(rank)
    piece = wide.tensor_split(2, dim=1)[a].tensor_split(2, dim=1)[b]
    y = sf.GlobalTensor.from_local(piece, m22, (sf.S(1), sf.S(1)), check=True)
    assert tuple(y.shape) == (2, 7)
    torch.testing.assert_close(y.full(), wide)


def _from_local_errors():
    rank = dist.get_rank()
    mesh = sf.Mesh("cpu", (4,))
    rows = [3, 3, 3, 1][rank]  # not a tensor_split of any length
    _expect_error(
        lambda: sf.GlobalTensor.from_local(torch.zeros(rows, 2), mesh, sf.S(0)),
        ValueError,
        "from_local shards cannot form global shape (10, 2) with sbp (S(0),)",
    )
    _expect_error(
        lambda: sf.GlobalTensor.from_local(torch.zeros(5, 2), mesh, sf.S(0), shape=(8, 2)),
        ValueError,
        f"from_local shard of shape (5, 2) on rank {rank} cannot be part of global shape (8, 2)",
    )
    _expect_error(
        lambda: sf.GlobalTensor.from_local(torch.zeros(2), mesh, sf.S(1), shape=(8,)),
        ValueError,
        "split dim must be < 1",
    )


def _outside_the_mesh():
    rank = dist.get_rank()
    half = sf.Mesh("cpu", (2,), ranks=[1, 3])
    x = sf.distribute(torch.ones(5, 2) * 7, half, sf.S(0), src=2)  # the value comes from a rank outside
    assert tuple(x.shape) == (5, 2)
    if rank in half:
        assert x.to_local().shape[0] == (3 if rank == 1 else 2)
        torch.testing.assert_close(x.full(), torch.full((5, 2), 7.0))
    else:
        assert x.to_local().numel() == 0 and x.full().numel() == 0
    # a P layout from a source inside the mesh holds the value on the source's coordinate
    p = sf.distribute(torch.ones(2), half, sf.P, src=3)
    torch.testing.assert_close(p.to_local(), torch.ones(2) if rank == 3 else torch.zeros(2 if rank == 1 else 0))
    if rank in half:
        sub = half["d0"]
        assert sub == half
    else:
        _expect_error(lambda: half["d0"], ValueError, f"rank {rank} is not in")


def _optimizer_step_equals_plain_torch():
    mesh = sf.Mesh("cpu", (2, 2), names=("dp", "tp"))
    torch.manual_seed(0)
    w0, data = torch.randn(6, 4), torch.randn(3, 6)
    ref = torch.nn.Parameter(w0.clone())
    param = torch.nn.Parameter(sf.distribute(w0, mesh, (sf.B, sf.S(1))))
    assert isinstance(param, sf.GlobalTensor) and param.sbp == (sf.B, sf.S(1))
    opt_ref = torch.optim.SGD([ref], lr=0.1, momentum=0.9, foreach=False)
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9, foreach=False)
    for _ in range(3):
        for p, o in ((ref, opt_ref), (param, opt)):
            o.zero_grad()
            full = p.full() if isinstance(p, sf.GlobalTensor) else p
            torch.tanh(data @ full).pow(2).mean().backward()
            o.step()
    torch.testing.assert_close(param.full(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert "sbp=(B, S(1))" in repr(param)


def _eager_arithmetic_boxes_and_refuses_what_is_wrong():
    mesh = sf.Mesh("cpu", (4,))
    other = sf.Mesh("cpu", (2,), ranks=[0, 1])
    a = sf.distribute(torch.arange(8.0), mesh, sf.S(0))
    b = sf.distribute(torch.ones(8), mesh, sf.B)
    c = a + b  # b is boxed to a's layout
    assert c.sbp == (sf.S(0),)
    torch.testing.assert_close(c.full(), torch.arange(8.0) + 1)
    d = sf.distribute(torch.ones(8), other, sf.B)
    _expect_error(lambda: a + d, ValueError, "operands live on different meshes")
    _expect_error(lambda: torch.matmul(a, a), NotImplementedError, "no layout rule for aten.")
    p = sf.distribute(torch.ones(8), mesh, sf.P)
    torch.testing.assert_close((p + 1).full(), torch.full((8,), 2.0))  # P is summed before adding the number
    ones = torch.ones(8)
    for got, want in [(a <= b, torch.arange(8.0) <= ones), (a >= b, torch.arange(8.0) >= ones)]:  # masks
        assert got.sbp == (sf.S(0),)
        torch.testing.assert_close(got.full(), want)
    # a cast naming the device too (HF's RoPE: inv_freq.to(device=x.device, dtype=torch.float))
    cast = a.double().to(device=a.device, dtype=torch.float32)
    assert cast.dtype == torch.float32 and cast.sbp == (sf.S(0),)
    torch.testing.assert_close(cast.full(), torch.arange(8.0))


def _repeated_ops_take_the_fast_path_only_when_nothing_changes():
    """A call seen before (function, layouts, shapes, typed scalars) runs on the shards without a decision:
    results stay right, a new layout or scalar type is decided again, and a call that boxes, needs a
    gradient, returns a view, computes its op's arguments or runs under a dispatch mode never skips."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from shardflow.tensor import fast_path
    from shardflow.tensor.trace import recording

    mesh = sf.Mesh("cpu", (4,))
    x, y = torch.arange(8.0), torch.linspace(-1, 1, 8)
    a, b = sf.distribute(x, mesh, sf.S(0)), sf.distribute(y, mesh, sf.S(0))
    fast_path.HITS.clear()
    for i in range(4):
        c = a * b + i
        assert c.sbp == (sf.S(0),)
        torch.testing.assert_close(c.full(), x * y + i)
    calls = {k[0] for k, hit in fast_path.HITS.items() if hit is not fast_path.NEVER}
    assert torch.Tensor.mul in calls and torch.Tensor.add in calls, calls
    n = sf.distribute(torch.arange(8), mesh, sf.S(0))  # integers: 1 and 1.0 are equal keys by value
    for _ in range(2):
        assert (n + 1).dtype == torch.int64 and (n + 1.0).dtype == torch.float32
    torch.testing.assert_close((n + 1.0).full(), torch.arange(8) + 1.0)
    whole = sf.distribute(y, mesh, sf.B)
    for _ in range(3):  # same op and shapes, other layout: boxed every time, never a fast hit
        c = a * whole
        assert c.sbp == (sf.S(0),)
        torch.testing.assert_close(c.full(), x * y)
    p = sf.distribute(y, mesh, sf.P)
    for _ in range(3):  # a partial sum is reduced before the scalar is added, on every call
        torch.testing.assert_close((p + 1).full(), y + 1)
    m = sf.distribute(torch.arange(8.0).reshape(2, 4), mesh, sf.S(1))
    for _ in range(3):
        t = m.t()  # a view: the wrapper's view relation is autograd's, never answered from the cache
        torch.testing.assert_close(t.full(), torch.arange(8.0).reshape(2, 4).t())
        torch.testing.assert_close(m.sum_to_size(2, 1).full(), torch.arange(8.0).reshape(2, 4).sum(1, keepdim=True))
    refused = {k[0] for k, hit in fast_path.HITS.items() if hit is fast_path.NEVER}
    assert {torch.Tensor.t, torch.Tensor.sum_to_size} <= refused, refused
    assert fast_path.HITS[(torch.Tensor.mul, a._sig, b._sig)] is not fast_path.NEVER  # still answered
    # a gradient flows through calls the cache knows (a * b, + i above)
    g = sf.distribute(x, mesh, sf.S(0)).requires_grad_()
    (g * b + 1).sum().backward()
    torch.testing.assert_close(g.grad.full(), y)
    # a dispatch mode sees the op on GlobalTensors, and a recording sees every op
    seen: list = []

    class Types(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(type(args[0]).__name__)
            return func(*args, **(kwargs or {}))

    with Types():
        a * b
    assert seen == ["GlobalTensor"], seen
    with recording() as rec:
        a * b + 1
    assert len(rec.ops) == 2, rec.ops
    for _ in range(3):  # the op takes the tensors in another order (where(c, a, b)): compared by identity
        torch.testing.assert_close(a.where(a > 3, b).full(), x.where(x > 3, y))
    for _ in range(2):
        a * 2
    meta = a.to("meta")  # the same layout, shape and dtype on another device: its own signature
    for _ in range(2):
        r = meta * 2
        assert r.device.type == "meta" and r._local.device.type == "meta", (r.device, r._local.device)
    with torch.no_grad():  # a local that requires grad is held detached: no graph on it behind the wrapper
        held = sf.GlobalTensor.from_local(
            x.tensor_split(4)[dist.get_rank()].clone().requires_grad_(), mesh, sf.S(0), (8,)
        )
    for _ in range(2):
        assert not (held * 2)._local.requires_grad
    for _ in range(2):  # tensors inside a tuple: never kept in a key (they would stay alive with it)
        torch.testing.assert_close(torch.cat((a, b)).full(), torch.cat((x, y)))
    held = [v[1] for k in fast_path.HITS for v in k[1:] if isinstance(v, tuple) and isinstance(v[1], tuple)]
    assert not any(isinstance(t, torch.Tensor) for v in held for t in v), held


def _dtensor_round_trip():
    from torch.distributed.tensor import DTensor

    from shardflow.tensor.dtensor import from_dtensor, to_dtensor

    mesh = sf.Mesh("cpu", (2, 2), names=("dp", "tp"))
    full = torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4)
    for sbp in [(sf.S(0), sf.S(1)), (sf.S(0), sf.S(0)), (sf.P, sf.B), (sf.B, sf.S(1))]:
        x = sf.distribute(full, mesh, sbp)
        d = to_dtensor(x)
        assert isinstance(d, DTensor)
        torch.testing.assert_close(d.full_tensor(), full)
        back = from_dtensor(d, mesh)
        assert back.sbp == sbp
        torch.testing.assert_close(back.full(), full)
    uneven = sf.distribute(torch.zeros(7, 4), mesh, (sf.S(0), sf.B))
    _expect_error(lambda: to_dtensor(uneven), ValueError, "splits dim 0 of shape (7, 4) unevenly")


@pytest.mark.parametrize(
    "body",
    [
        _from_local_infers_uneven_shape_and_backprops,
        _from_local_errors,
        _outside_the_mesh,
        _optimizer_step_equals_plain_torch,
        _eager_arithmetic_boxes_and_refuses_what_is_wrong,
        _repeated_ops_take_the_fast_path_only_when_nothing_changes,
        _dtensor_round_trip,
    ],
)
def test_on_four_ranks(body):
    run_on_ranks(4, body)


def _mesh_errors_in_a_job():
    _expect_error(lambda: sf.Mesh("cpu", (2, 4)), ValueError, "mesh of shape (2, 4) needs 8 ranks but the job has 4")
    _expect_error(
        lambda: sf.Mesh("cpu", (2,), ranks=[0, 4]), ValueError, "mesh ranks [4] are out of range for a job of 4 ranks"
    )
    m = sf.Mesh("cpu", (2, 2), names=("dp", "tp"))
    sub = m["tp"]
    assert sub.names == ("tp",) and dist.get_rank() in sub.ranks and len(sub.ranks) == 2


def test_mesh_errors_in_a_job():
    run_on_ranks(4, _mesh_errors_in_a_job)


def test_init_is_idempotent_and_starts_a_world_of_one():
    code = (
        "import torch.distributed as dist, shardflow as sf\n"
        "sf.init(); sf.init()\n"
        "x = sf.distribute(__import__('torch').ones(3), sf.Mesh('cpu', (1,)), sf.S(0))\n"
        "print(dist.get_world_size(), dist.get_backend(), x.full().tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "1 gloo [1.0, 1.0, 1.0]"
