"""The planner, without processes: routes, costs, caching, and (by simulation) correctness of every plan."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shardflow as sf
from tests.boxing.simulate import check_plan

M4 = sf.Mesh("cpu", (4,))
M22 = sf.Mesh("cpu", (2, 2), names=("dp", "tp"))


@pytest.mark.parametrize(
    "src, dst, route",
    [
        (sf.S(0), sf.B, "all_gather"),
        (sf.P, sf.B, "all_reduce"),
        (sf.P, sf.S(1), "reduce_scatter"),
        (sf.B, sf.S(0), "slice"),
        (sf.S(0), sf.S(1), "all_to_all"),
        (sf.B, sf.P, "mask"),
        (sf.S(1), sf.P, "pad"),
        (sf.S(1), sf.S(1), "identity"),
    ],
)
def test_every_1d_route_is_the_table_row(src, dst, route):
    plan = sf.plan_boxing((8, 6), torch.float32, M4, (src,), M4, (dst,))
    assert plan.route == route
    check_plan((8, 6), M4, (src,), M4, (dst,))


def test_bytes_per_rank_of_all_gather():
    plan = sf.plan_boxing((8, 6), torch.float32, M4, (sf.S(0),), M4, (sf.B,))
    assert plan.bytes_per_rank == 3 * 2 * 6 * 4  # ring: each rank sends its 2x6 shard to 3 others


def test_reduce_scatter_is_preferred_over_all_reduce_to_drop_partial():
    plan = sf.plan_boxing((8, 6), torch.float32, M4, (sf.P,), sf.Mesh("cpu", (2,), ranks=[4, 5]), (sf.B,))
    assert plan.steps[0].kind == "reduce_scatter" and plan.steps[-1].kind == "send_recv"


def test_plans_are_cached():
    a = sf.plan_boxing((8, 6), torch.float32, M22, (sf.P, sf.S(0)), M22, (sf.B, sf.B))
    b = sf.plan_boxing((8, 6), torch.float32, M22, (sf.P, sf.S(0)), M22, (sf.B, sf.B))
    assert a is b


def test_nested_split_changes_inner_axis_first():
    plan = check_plan((8, 6), M22, (sf.S(0), sf.S(0)), M22, (sf.B, sf.S(0)))
    assert [s.kind for s in plan.steps][0] == "all_gather" and plan.steps[0].axis == 1


def test_explain_golden():
    plan = sf.plan_boxing((8, 6), torch.float32, M22, (sf.S(0), sf.B), M22, (sf.B, sf.S(0)))
    assert plan.explain() == (
        "boxing (S(0), B) -> (B, S(0)) on Mesh('cpu', dp=2, tp=2), shape (8, 6) float32: 2 step(s), 96 B/rank, ~0.050 ms\n"
        "  1. all_gather     axis 'dp' (size 2): (S(0), B) -> (B, B)  96 B/rank  ~0.050 ms\n"
        "  2. slice          axis 'tp' (size 2): (B, B) -> (B, S(0))  0 B/rank  ~0.000 ms"
    )


def _layout(ndim):
    return st.sampled_from([sf.B, sf.P] + [sf.S(d) for d in range(ndim)])


@st.composite
def _case(draw, cross):
    shape = tuple(draw(st.lists(st.integers(0, 7), min_size=1, max_size=3)))
    mesh_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    src_mesh = sf.Mesh("cpu", mesh_shape)
    if cross:
        dst_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
        n = 1
        for s in dst_shape:
            n *= s
        offset = draw(st.integers(0, 4))
        dst_mesh = sf.Mesh("cpu", dst_shape, ranks=list(range(offset, offset + n)))
    else:
        dst_mesh = src_mesh
    src = tuple(draw(_layout(len(shape))) for _ in src_mesh.shape)
    dst = tuple(draw(_layout(len(shape))) for _ in dst_mesh.shape)
    return shape, src_mesh, src, dst_mesh, dst


@settings(max_examples=300)
@given(case=_case(cross=False))
def test_every_plan_on_one_mesh_keeps_the_logical_tensor(case):
    check_plan(*case)


@settings(max_examples=200)
@given(case=_case(cross=True))
def test_every_cross_mesh_plan_keeps_the_logical_tensor(case):
    check_plan(*case)
