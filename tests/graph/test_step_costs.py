"""What a step costs beyond its ops' rooflines, as the cost model prices it: the collectives a local function
runs inside an op (synchronised BatchNorm's statistics), what a collective costs inside a step, how much
of a started one compute hides, and op and update times measured on this machine for its own profile."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
import torch

import shardflow as sf
from shardflow.cost.profile import DeviceProfile, LinkFit, machine_name
from shardflow.graph import kernel_time
from shardflow.graph.kernel_time import KernelCall, kernel_seconds, measures_here, update_seconds_here
from shardflow.models import MLP, MLPConfig
from shardflow.ops import INSIDE, LOCALS, InnerBox, LocalContext, OpCall, TensorMeta
from shardflow.placement.sbp import B, P, S
from shardflow.testing.memory import memory_case
from shardflow.testing.profiles import KINDS, synthetic_profile


def _profile(**changes: object) -> DeviceProfile:
    """A device whose ops take no time and whose links cost 1 ms each, whatever they move."""
    return synthetic_profile(matmul=1e30, latency=1e-3, bus_bandwidth=1e30, **changes)


def test_synchronised_batch_norm_prices_its_statistics_all_reduces():
    """A data-parallel step of the BatchNorm CNN runs, beside its one gradient bucket and the reported loss's
    all-reduce, collectives no program line shows: each BatchNorm of C channels all-reduces its batch's sum
    and centred sum of squares forward (C floats each) and both gradient sums backward (2C floats, which are
    also its weight's and bias's gradients: the bucket leaves them out), and the loss its global weight. On
    1 MB/s links with no latency (2 ranks: one bus byte per byte) and nothing else costing time, the step moves
    exactly those bytes; each of the 9 collectives pays the profile's in-step cost, and each of the 8
    synchronous ones (all but the gradient bucket: BatchNorm's six, the loss's weight, the reported loss) its
    boxing cost on the compute clock; on one rank there are none."""
    model, batch = memory_case("cnn")
    dp = sf.plan(model, sf.MeshSpec("cpu", (2,), ("dp",), (0, 1)), batch).replace(bucket_bytes=1 << 30)
    links = tuple(LinkFit(k, 2, 0.0, 1e6) for k in KINDS)
    time = dp.estimate(model, batch, device=_profile(collectives=links)).classes[0].time
    # the BatchNorms' weight and bias gradients are the global sums their backward all-reduced already
    grads = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.startswith("bn"))
    statistics = sum(4 * (2 * c + 2 * c) for c in (16, 32))  # the CNN's two BatchNorms
    assert time.communication == pytest.approx((grads + 4 + 4 + statistics) / 1e6, rel=1e-9)
    paid = dp.estimate(model, batch, device=_profile(collectives=links, in_step=1e-3)).classes[0].time
    assert paid.communication - time.communication == pytest.approx(9e-3, rel=1e-9)
    boxed = dp.estimate(model, batch, device=_profile(collectives=links, box_overhead=1e-3)).classes[0].time
    hidden = time.exposed - boxed.exposed  # what of the started bucket the longer compute now hides
    assert (
        boxed.total - time.total + hidden == pytest.approx(8e-3, rel=1e-9) and boxed.communication == time.communication
    )
    one = sf.plan(model, sf.MeshSpec("cpu", (1,), ("dp",), (0,)), batch)
    assert one.estimate(model, batch, device=_profile()).classes[0].time.communication == 0.0
    assert one.estimate(model, batch, device=_profile(box_overhead=1.0)).step_seconds < 1e-6


def test_every_collective_pays_the_in_step_cost_and_shares_cores_as_the_overlap_says():
    """The profile's ``in_step`` is added to every collective and its ``link_scale`` stretches the bytes' time
    (not the latency); with ``overlap`` 0 a started collective (a gradient bucket during backward) delays
    compute by its whole time, so nothing is hidden and the step is compute plus communication."""
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=64, hidden_sizes=(256, 256), num_classes=8))
    batch = (torch.randn(32, 64), torch.randint(0, 8, (32,)))
    plan = sf.plan(model, sf.MeshSpec("cpu", (2,), ("dp",), (0, 1)), batch).replace(bucket_bytes=64 * 1024)
    slow = {"matmul": {"float32": 1e8}, "vector": {"float32": 1e30}}
    links = tuple(LinkFit(k, 2, 0.0, 1e9) for k in KINDS)
    base = _profile(flops=slow, collectives=links)
    hidden = plan.estimate(model, batch, device=base).classes[0].time
    assert hidden.exposed < 0.5 * hidden.communication  # buckets launched during backward hide behind it
    assert base.collective("all_reduce", 2, 1e6) == pytest.approx(1e-3)
    assert dataclasses.replace(base, in_step=2e-4).collective("all_reduce", 2, 1e6) == pytest.approx(1.2e-3)
    slow = dataclasses.replace(base, link_scale=1.5, collectives=tuple(LinkFit(k, 2, 1e-4, 1e9) for k in KINDS))
    assert slow.collective("all_reduce", 2, 1e6) == pytest.approx(1e-4 + 1.5e-3)
    shared = plan.estimate(model, batch, device=dataclasses.replace(base, overlap=0.0)).classes[0].time
    assert shared.communication == pytest.approx(hidden.communication, rel=1e-9)
    assert shared.exposed == pytest.approx(shared.communication, rel=1e-9)
    compute = sum(shared.compute.values())
    assert shared.total == pytest.approx(compute + shared.communication + shared.update, rel=1e-9)


def test_the_kernel_scale_stretches_ops_and_updates_not_launches():
    """A profile's ``kernel_scale`` (an op's time inside a step over its time alone) multiplies every op's and
    the update's own time on one rank, rooflines and times measured here alike; the launch per line and the
    per-step cost stay as they are."""
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=64, hidden_sizes=(256,), num_classes=8))
    batch = (torch.randn(32, 64), torch.randint(0, 8, (32,)))
    plan = sf.plan(model, sf.MeshSpec("cpu", (1,), ("dp",), (0,)), batch)
    slow = {"matmul": {"float32": 1e8}, "vector": {"float32": 1e9}}
    base = _profile(flops=slow, memory_bandwidth=1e9)
    ops = plan.estimate(model, batch, device=base).step_seconds
    assert ops > 0 and plan.estimate(model, batch, device=dataclasses.replace(base, kernel_scale=2.0)).step_seconds == (
        pytest.approx(2 * ops, rel=1e-9)
    )
    runtime = {"launch": 1e-5, "step_overhead": 1e-3}
    one, two = (
        plan.estimate(model, batch, device=dataclasses.replace(base, kernel_scale=k, **runtime)).step_seconds
        for k in (1.0, 2.0)
    )
    assert one > ops + 1e-3 and two - one == pytest.approx(ops, rel=1e-9)
    timed = plan.estimate(model, batch, device=_here()).step_seconds  # this machine's own: timed here, cached
    assert timed != ops and plan.estimate(model, batch, device=_here(kernel_scale=2.0)).step_seconds == (
        pytest.approx(2 * timed, rel=1e-9)
    )


def _here(**changes: object) -> DeviceProfile:
    return _profile(name=machine_name(), calibrated=True, threads=1, **changes)


def test_only_this_machines_own_profile_times_ops_here():
    assert measures_here(_here())
    assert not measures_here(_profile())  # another machine's name
    assert not measures_here(_profile(name=machine_name()))  # not calibrated: a datasheet
    assert not measures_here(_here(device_type="cuda"))


def test_a_timed_op_is_its_measured_seconds_once():
    """An mm timed here is of the order of the same product timed here independently (a factor of 10 either
    way: a shared machine's spikes, not a speed check), and a second price of it is the cached figure; an op
    that cannot run on random operands (a view to a size it does not have), or whose result is not the
    program's local shape, keeps its roofline."""
    call = KernelCall(torch.ops.aten.mm.default, (_Meta((256, 256)), _Meta((256, 512))), {}, ((256, 512),))
    profile = _here()
    seconds = kernel_seconds(call, profile)
    a, b = torch.randn(256, 256), torch.randn(256, 512)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(20):
                a @ b
            runs.append((time.perf_counter() - start) / 20)
        independent = min(runs)
    finally:
        torch.set_num_threads(before)
    assert seconds is not None and independent / 10 < seconds < independent * 10
    cached = len(kernel_time._TIMES)
    assert kernel_seconds(call, profile) == seconds and len(kernel_time._TIMES) == cached
    bad = KernelCall(torch.ops.aten.view.default, (_Meta((4, 4)), [7]), {}, ((7,),))
    assert kernel_seconds(bad, profile) is None
    # a local function's op called as is with its global size argument: not the program's local result
    other = KernelCall(torch.ops.aten.new_zeros.default, (_Meta((4, 4)), [8, 4]), {}, ((4, 4),))
    assert kernel_seconds(other, profile) is None


def test_an_update_is_timed_with_the_optimizers_own_settings():
    """AdamW's defaults hold a key its constructor does not take; the timed update still runs, a larger set of
    tensors takes longer, and so does a step that walks past many parameters without a gradient."""
    params = [torch.nn.Parameter(torch.empty(256, 256, device="meta"))]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, weight_decay=0.1)
    small = update_seconds_here(optimizer, params, _here())
    large = update_seconds_here(optimizer, params * 8, _here())
    assert 0 < small < large
    # a unit's step among 50,000 other parameters checks each for a gradient: far more than 1 tensor's kernels
    assert update_seconds_here(optimizer, params, _here(), skipped=50_000) > 3 * small


class _Meta:
    """Tensor metadata as the program records it: a shape and a dtype."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
        self.shape, self.dtype = shape, dtype

    def __repr__(self) -> str:
        return f"_Meta({self.shape}, {self.dtype})"


def _recorded_boxes(func: Any, args: tuple[Any, ...], ins: tuple[Any, ...], outs: tuple[Any, ...]) -> list[InnerBox]:
    """The conversions ``func``'s local function makes on a virtual 2-rank mesh (rank 0), recorded by a boxer
    that keeps each local as it is (a P -> B sum has the local's shape), beside what its ``Inside`` declares."""
    mesh = sf.Mesh("cpu", (2,), virtual=True)
    metas = tuple(TensorMeta(tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor))
    meta_args = tuple(TensorMeta(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
    call = OpCall(func, meta_args, {}, metas)
    seen: list[InnerBox] = []

    def box(local: torch.Tensor, src: Any, shape: tuple[int, ...], dst: Any) -> torch.Tensor:
        seen.append(InnerBox(tuple(shape), src, dst))
        return local

    ctx = LocalContext(call, mesh, (0,), ins, outs, (None,) * 3, box)
    LOCALS[func](ctx, args, {})
    assert list(INSIDE[func](ctx).boxes) == seen
    return seen


def test_inside_declares_the_boxes_each_local_function_makes():
    """Each ``ops.Inside`` lists exactly the conversions its local function makes, checked by running the
    local function with a recording boxer: batch-split BatchNorm forward and backward, the split loss, a
    split vector norm."""
    aten = torch.ops.aten
    split, whole = (S(0),), (B,)
    x, w, b = torch.randn(4, 3, 5, 5), torch.randn(3), torch.randn(3)
    forward = (x, w, b, torch.zeros(3), torch.ones(3), True, 0.1, 1e-5)
    assert (
        len(_recorded_boxes(aten.native_batch_norm.default, forward, (split,) + (whole,) * 4, (split, whole, whole)))
        == 2
    )
    mean, invstd = torch.zeros(3), torch.ones(3)
    backward = (torch.randn(4, 3, 5, 5), x, w, None, None, mean, invstd, True, 1e-5, [True, True, True])
    ins = (split, split, whole, whole, whole)
    assert len(_recorded_boxes(aten.native_batch_norm_backward.default, backward, ins, (split, whole, whole))) == 1
    logp, target = torch.randn(4, 6).log_softmax(1), torch.randint(0, 6, (4,))
    assert (
        len(_recorded_boxes(aten.nll_loss_forward.default, (logp, target, None, 1, -100), (split, split), (P, P))) == 1
    )
    norm = (torch.randn(4, 6), 2.0)
    assert len(_recorded_boxes(aten.linalg_vector_norm.default, norm, (split,), (whole,))) == 1
