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


# Link speeds far from the defaults, so that each term of the formula shows in the printed figures.
SLOW = sf.CostModel(bandwidth=1e6, latency=1e-3, memory_bandwidth=1e5, launch=2e-3)


def _ring_seconds(cost: sf.CostModel, k: int, hops: int, sent: float) -> float:
    """One collective over a ring of ``k`` ranks: a launch, ``hops`` latencies, the bytes a rank sends."""
    return cost.launch + hops * cost.latency + sent / cost.bandwidth


@pytest.mark.parametrize("cost", [sf.boxing.DEFAULT_COST, SLOW])
def test_explain_prices_each_step_by_the_ring_formula(cost):
    # a (8, 6) float32 tensor: the dp all-gather sends half of the 192 gathered bytes; slicing tp is a memory
    # pass over the 4x6 shard it keeps (plus a fixed overhead of 0.1 us per local step, under the printed digits)
    gather_bytes = (2 - 1) * 192 // 2
    gather_s = _ring_seconds(cost, 2, 1, gather_bytes)
    slice_s = 4 * 6 * 4 / cost.memory_bandwidth
    plan = sf.plan_boxing((8, 6), torch.float32, M22, (sf.S(0), sf.B), M22, (sf.B, sf.S(0)), cost=cost)
    assert plan.seconds == pytest.approx(gather_s + slice_s, abs=2e-7)
    assert plan.explain() == (
        "boxing (S(0), B) -> (B, S(0)) on Mesh('cpu', dp=2, tp=2), shape (8, 6) float32: "
        f"2 step(s), {gather_bytes} B/rank, ~{(gather_s + slice_s) * 1e3:.3f} ms\n"
        f"  1. all_gather     axis 'dp' (size 2): (S(0), B) -> (B, B)  {gather_bytes} B/rank  ~{gather_s * 1e3:.3f} ms\n"
        f"  2. slice          axis 'tp' (size 2): (B, B) -> (B, S(0))  0 B/rank  ~{slice_s * 1e3:.3f} ms"
    )


FULL = 8 * 8 * 4  # bytes of the (8, 8) float32 tensor below, which splits evenly over 4 ranks


@pytest.mark.parametrize(
    "src, dst, sent, hops, priced",
    [  # ring algorithms over k = 4 ranks: bytes each rank sends, latency hops, bytes the bandwidth term sees
        (sf.S(0), sf.B, 3 * FULL // 4, 3, 3 * FULL / 4),  # all-gather: (k-1)/k of the gathered tensor
        (sf.P, sf.S(1), 3 * FULL // 4, 3, 3 * FULL / 4),  # reduce-scatter: (k-1)/k of the reduced tensor
        (sf.P, sf.B, 2 * 3 * FULL // 4, 6, 2 * 3 * FULL / 4),  # all-reduce: 2(k-1)/k, both rings
        (sf.S(0), sf.S(1), 3 * (FULL // 4) // 4, 3, 3 * (FULL // 4) / 4),  # all-to-all: (k-1)/k of a shard
    ],
)
def test_collective_bytes_and_seconds_follow_the_ring_formulas(src, dst, sent, hops, priced):
    plan = sf.plan_boxing((8, 8), torch.float32, M4, (src,), M4, (dst,), cost=SLOW)
    assert len(plan.steps) == 1 and plan.bytes_per_rank == sent, plan.explain()
    assert plan.seconds == pytest.approx(_ring_seconds(SLOW, 4, hops, priced), rel=1e-9), plan.explain()


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
