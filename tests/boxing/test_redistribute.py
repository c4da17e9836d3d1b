"""Boxing on real gloo ranks: values and gradients against plain PyTorch, for random shapes (uneven and
size 0), dtypes, meshes of 1-4 ranks inside a 4-rank job, 2x2, and across meshes. Examples are drawn in
the parent (derandomised) and every rank runs the same one."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import shardflow as sf
from shardflow.placement.shard import has_shards
from shardflow.testing import run_on_ranks

WORLD = 4
MESHES = [  # (shape, ranks): 1, 2, 3, 4 ranks; 2x2; sub-meshes that leave ranks out
    ((1,), [2]),
    ((2,), [0, 1]),
    ((2,), [3, 1]),
    ((3,), [0, 1, 2]),
    ((3,), [1, 2, 3]),
    ((4,), [0, 1, 2, 3]),
    ((2, 2), [0, 1, 2, 3]),
    ((2, 2), [3, 2, 1, 0]),
]


def _settings(n: int) -> settings:
    # derandomised by tests/conftest.py's profile; the examples are drawn here in the parent, not on the ranks
    return settings(max_examples=n, suppress_health_check=list(HealthCheck))


def _layout(ndim):
    return st.sampled_from([sf.B, sf.P] + [sf.S(d) for d in range(ndim)])


@st.composite
def blocked_cases(draw, cross: bool):
    """Layouts with ``Blocked(d, k)`` on some axes (a dim of k equal blocks), the rest like ``cases``."""
    k = draw(st.sampled_from([2, 3]))
    shape = list(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    d = draw(st.integers(0, len(shape) - 1))
    shape[d] *= k
    shape = tuple(shape)
    src_mesh = draw(st.sampled_from(MESHES))
    dst_mesh = draw(st.sampled_from(MESHES)) if cross else src_mesh
    place = st.sampled_from([sf.B, sf.P, sf.Blocked(d, k)] + [sf.S(i) for i in range(len(shape))])
    src = tuple(draw(place) for _ in src_mesh[0])
    dst = tuple(draw(place) for _ in dst_mesh[0])
    assume(has_shards(src) and has_shards(dst) and sf.Blocked(d, k) in src + dst)
    return shape, "float64", src_mesh, src, dst_mesh, dst


@st.composite
def cases(draw, cross: bool):
    shape = tuple(draw(st.lists(st.integers(0, 7), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(["float32", "float64", "int64"]))
    src_mesh = draw(st.sampled_from(MESHES))
    dst_mesh = draw(st.sampled_from(MESHES)) if cross else src_mesh
    src = tuple(draw(_layout(len(shape))) for _ in src_mesh[0])
    dst = tuple(draw(_layout(len(shape))) for _ in dst_mesh[0])
    return shape, dtype, src_mesh, src, dst_mesh, dst


def _rank_check(case) -> None:
    shape, dtype_name, (ss, sr), src, (ds, dr), dst = case
    dtype = getattr(torch, dtype_name)
    rank = dist.get_rank()
    src_mesh, dst_mesh = sf.Mesh("cpu", ss, ranks=sr), sf.Mesh("cpu", ds, ranks=dr)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype_name)).encode()))  # same on every rank
    if dtype.is_floating_point:
        full = torch.randn(shape, generator=gen, dtype=dtype)
    else:
        full = torch.randint(-50, 50, shape, generator=gen, dtype=dtype)
    x = sf.distribute(full, src_mesh, src)
    if any(isinstance(p, sf.Blocked) for p in src):  # the global shape follows from the locals' shapes
        assert tuple(sf.from_local(x.to_local().detach(), src_mesh, src).shape) == shape
    if dtype.is_floating_point:
        x.requires_grad_()
    y = x.redistribute(dst, mesh=dst_mesh)
    assert y.sbp == dst and y.mesh == dst_mesh and tuple(y.shape) == shape
    got = y.full()
    if rank in dst_mesh:
        torch.testing.assert_close(got, full, rtol=1e-6, atol=1e-6)
    else:
        assert got.numel() == 0 and y.to_local().numel() == 0
    if not dtype.is_floating_point:
        return
    # gradient arriving as B: one logical loss computed identically on every rank of the target mesh
    w = torch.randn(shape, generator=gen, dtype=dtype)
    loss = (got * (w if rank in dst_mesh else got)).sum()
    loss.backward()
    if rank in src_mesh:
        assert x.grad is not None and x.grad.sbp == sf.placement.grad_sbp(src)
        torch.testing.assert_close(x.grad.full(), w, rtol=1e-6, atol=1e-6)
    else:
        x.grad.full()  # collective: every rank takes part
    # gradient arriving as P: every target rank contributes its own partial gradient
    x.grad = None
    z = x.redistribute(dst, mesh=dst_mesh).redistribute((sf.B,) * dst_mesh.ndim)
    mine = torch.randn(shape, generator=torch.Generator().manual_seed(rank), dtype=dtype)
    local = z.to_local(grad_sbp=(sf.P,) * dst_mesh.ndim)
    (local * (mine if rank in dst_mesh else local)).sum().backward()
    expected = sum(torch.randn(shape, generator=torch.Generator().manual_seed(r), dtype=dtype) for r in dst_mesh.ranks)
    grad = x.grad.full()
    if rank in src_mesh:
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


@_settings(300)
@given(case=cases(cross=False))
def test_redistribute_on_one_mesh_equals_plain_torch(case):
    run_on_ranks(WORLD, _rank_check, case)


@_settings(200)
@given(case=cases(cross=True))
def test_redistribute_across_meshes_equals_plain_torch(case):
    run_on_ranks(WORLD, _rank_check, case)


@_settings(150)
@given(case=blocked_cases(cross=False))
def test_blocked_redistribute_on_one_mesh_equals_plain_torch(case):
    run_on_ranks(WORLD, _rank_check, case)


@_settings(80)
@given(case=blocked_cases(cross=True))
def test_blocked_redistribute_across_meshes_equals_plain_torch(case):
    run_on_ranks(WORLD, _rank_check, case)


def _named_cross_mesh(src_shape, src_ranks, dst_shape, dst_ranks) -> None:
    for src in ([sf.S(0)], [sf.P], [sf.B]):
        for dst in ([sf.S(1)], [sf.B], [sf.P]):
            s = tuple(src * len(src_shape))
            d = tuple(dst * len(dst_shape))
            _rank_check(((7, 5), "float32", (src_shape, src_ranks), s, (dst_shape, dst_ranks), d))


def test_named_cross_mesh_cases():
    """Meshes of different sizes: 2 ranks -> 4 ranks, 4 -> 3, and disjoint halves."""
    run_on_ranks(WORLD, _named_cross_mesh, (2,), [0, 1], (4,), [0, 1, 2, 3])
    run_on_ranks(WORLD, _named_cross_mesh, (4,), [0, 1, 2, 3], (3,), [1, 2, 3])
    run_on_ranks(WORLD, _named_cross_mesh, (2,), [0, 1], (2,), [2, 3])
    run_on_ranks(WORLD, _named_cross_mesh, (2, 2), [0, 1, 2, 3], (2,), [3, 2])
