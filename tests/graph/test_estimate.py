"""``plan.estimate``: a plan priced without running it, on a virtual mesh of any size, with no process group.

Its memory is checked against the compiled module's prediction and the measurement in test_memory.py (every
plan kind there); here: what one rank's estimate costs on 1,024 devices (traces, lowerings), the time model
against hand-computed figures on synthetic profiles, and the errors a user can meet."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

import shardflow as sf
from shardflow.cost.profile import DeviceProfile, LinkFit, ProfileError, device_profile
from shardflow.graph.estimate import LOWERED_KEPT, Estimator
from shardflow.models import GPT, MLP, GPTConfig, MLPConfig
from shardflow.testing import with_ranks
from shardflow.testing.memory import memory_case
from shardflow.testing.profiles import synthetic_profile


def _profile(**changes: object) -> DeviceProfile:
    """A synthetic device: 1 TFLOP/s matmuls, instant element-wise work and launches, 1 GB/s links."""
    return synthetic_profile(**changes)


def _mlp() -> tuple[MLP, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=64, hidden_sizes=(256, 256), num_classes=8))
    return model, (torch.randn(32, 64), torch.randint(0, 8, (32,)))


def test_one_rank_compute_is_the_matmuls_over_the_rate():
    """On a device where only matmuls take time, a step is its matmul FLOPs over the rate: forward 2·B·in·out
    per Linear, backward twice that except the first layer's input gradient (hand-counted, not the counter)."""
    model, batch = _mlp()
    plan = sf.plan(model, sf.MeshSpec("cpu", (1,), ("dp",), (0,)), batch)
    est = plan.estimate(model, batch, device=_profile())
    widths = [(64, 256), (256, 256), (256, 8)]
    forward = sum(2 * 32 * i * o for i, o in widths)
    backward = 2 * forward - 2 * 32 * 64 * 256
    assert est.step_seconds == pytest.approx((forward + backward) / 1e12, rel=1e-6)
    time = est.classes[0].time
    assert time.compute["forward"] == pytest.approx(forward / 1e12, rel=1e-6)
    assert time.communication == 0.0


def test_data_parallel_gradients_cost_a_ring_all_reduce_of_every_parameter():
    """Two ranks all-reduce every gradient once, the loss, and the global weight the loss's mean divides by:
    2(n-1)/n of their bytes over the bus, here with no compute at all, so it is exposed whole."""
    model, batch = _mlp()
    free = _profile(flops={"matmul": {"float32": 1e30}, "vector": {"float32": 1e30}})
    plan = sf.plan(model, sf.MeshSpec("cpu", (2,), ("dp",), (0, 1)), batch)
    est = plan.estimate(model, batch, device=free)
    nbytes = sum(p.numel() * 4 for p in model.parameters()) + 8  # the loss, and the global weight its mean divides by
    time = est.classes[0].time
    assert time.communication == pytest.approx(nbytes / 1e9, rel=1e-6)  # 2(2-1)/2 = 1 bus byte per byte
    assert time.exposed == pytest.approx(time.communication, rel=1e-6)
    # with compute to hide behind, buckets launched during backward overlap it; one bucket of everything is
    # launched once the last gradient exists and hides nothing
    slow = _profile(flops={"matmul": {"float32": 1e8}, "vector": {"float32": 1e30}})
    one = plan.estimate(model, batch, device=slow).classes[0].time
    assert one.exposed == pytest.approx(one.communication, rel=1e-6)
    small = plan.replace(bucket_bytes=64 * 1024).estimate(model, batch, device=slow).classes[0].time
    assert small.communication > one.communication and small.exposed < 0.5 * one.exposed


def test_links_price_bus_bytes_and_cross_nodes_by_their_ranks():
    """nccl-tests' factors on 4 ranks: an all-reduce moves 2·3/4 of the buffer per rank, a gather 3/4; the same
    four ranks strided over nodes (0, 4, 8, 12) take the network's fit, and so does a 4-way data-parallel
    group of a (dp, tp) = (4, 4) plan when a node holds 4 ranks, but not when it holds 16."""
    fast = (LinkFit("all_reduce", 4, 0.0, 1e9), LinkFit("all_gather", 4, 0.0, 1e9))
    profile = _profile(collectives=fast, node_size=4, network=(LinkFit("all_reduce", 4, 0.0, 1e8),))
    assert profile.collective("all_reduce", 4, 1e9, (0, 1, 2, 3)) == pytest.approx(1.5)
    assert profile.collective("all_gather", 4, 1e9, (0, 1, 2, 3)) == pytest.approx(0.75)
    assert profile.collective("all_reduce", 4, 1e9, (0, 4, 8, 12)) == pytest.approx(15.0)
    model, batch = _mlp()
    free = {"matmul": {"float32": 1e30}, "vector": {"float32": 1e30}}
    plan = sf.plan(model, sf.MeshSpec("cpu", (4,), ("dp",), (0, 1, 2, 3)), batch)
    est = plan.estimate(model, batch, device=_profile(flops=free, collectives=fast, node_size=4))
    nbytes = sum(p.numel() * 4 for p in model.parameters()) + 8  # the loss, and its mean's global weight
    assert est.classes[0].time.communication == pytest.approx(1.5 * nbytes / 1e9, rel=1e-6)
    grid = sf.MeshSpec("cpu", (4, 4), ("dp", "tp"), tuple(range(16)))
    hybrid = sf.plan(model, grid, batch, strategy="hybrid")
    one_node, four = (
        hybrid.estimate(model, batch, device=dataclasses.replace(profile, flops=free, node_size=n)).step_seconds
        for n in (16, 4)
    )
    assert four > 5 * one_node


def test_a_thousand_devices_price_in_one_trace_and_one_lowering():
    """A 1,024-device GPT plan on a virtual mesh: one rank's program stands for all when every shard has the
    same shape; an uneven batch split makes two kinds of rank, each priced once."""
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64))
    mesh = sf.Mesh("cuda", (512, 2), names=("dp", "tp"), virtual=True)
    x = torch.zeros((1024, 64), dtype=torch.long, device="meta")
    estimator = Estimator(model, (x, x), device="h100")
    est = estimator(sf.plan(model, mesh, (x, x), strategy="hybrid"))
    assert len(est.peak_bytes) == 1024 and len(set(est.peak_bytes)) == 1
    assert (estimator.traces, estimator.lowerings, len(est.classes)) == (1, 1, 1)
    assert 0 < est.step_seconds < 10 and 0 < est.mfu < 1
    uneven = torch.zeros((1000, 64), dtype=torch.long, device="meta")  # 1000 rows over 512: 2 or 1 each
    estimator = Estimator(model, (uneven, uneven), device="h100")
    est = estimator(sf.plan(model, mesh, (uneven, uneven), strategy="hybrid"))
    assert estimator.lowerings == 2 and sorted(len(c.ranks) for c in est.classes) == [48, 976]
    assert len(set(est.peak_bytes)) == 2


def test_an_estimator_prices_a_plan_again_on_another_device_without_lowering_it_again():
    """Pricing the same plan on several devices (a search comparing them, a calibration solving for a figure)
    lowers it once; each price equals a fresh estimator's, and another plan is lowered and priced as its own."""
    model, batch = _mlp()
    spec = sf.MeshSpec("cpu", (2,), ("dp",), (0, 1))
    dp, zero3 = sf.plan(model, spec, batch), sf.plan(model, spec, batch, zero=3)
    slow = _profile(matmul=1e9, latency=1e-4)
    estimator = Estimator(model, batch, device=_profile())
    for plan in (dp, zero3, dp):
        for device in (_profile(), slow):
            assert estimator(plan, device) == Estimator(model, batch)(plan, device)
    assert estimator.lowerings == 2
    assert estimator(dp, slow).step_seconds != estimator(zero3, slow).step_seconds
    for k in range(LOWERED_KEPT):  # as many other plans as it keeps: the oldest (dp) is dropped
        estimator(dp.replace(bucket_bytes=1024 * (k + 1)))
    estimator(dp)
    assert estimator.lowerings == 2 + LOWERED_KEPT + 1


def test_a_plan_of_another_size_than_the_profile_was_fitted_for_is_priced_with_a_warning():
    """A profile whose in-step figures were fitted for 2-rank jobs prices a 1-rank plan all the same, once
    warning which calibration fits it; a 2-rank plan, or a datasheet (fitted for no size), says nothing."""
    model, batch = _mlp()
    fitted = _profile(name="fitted-for-2", ranks=2)
    one = sf.plan(model, sf.MeshSpec("cpu", (1,), ("dp",), (0,)), batch)
    with pytest.warns(UserWarning, match=r"fitted for 2 ranks, this plan has 1; .*calibrate --ranks 1"):
        assert Estimator(model, batch, device=fitted)(one).step_seconds > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Estimator(model, batch, device=fitted)(sf.plan(model, sf.MeshSpec("cpu", (2,), ("dp",), (0, 1)), batch))
        Estimator(model, batch, device=_profile())(one)


def test_estimate_matches_the_module_on_one_rank_with_an_arena_and_recompute():
    model, batch = memory_case("gpt")
    mesh = sf.Mesh("cpu", (1,))
    for options in ({"arena": True}, {"recompute": True}, {"arena": "all"}):
        pm = sf.compile(model, mesh, batch, **options)
        assert pm.plan.estimate(model, batch, device="h100").peak_bytes == (pm.memory().peak,), options


@with_ranks(2)
def test_a_job_prices_a_larger_virtual_plan_without_groups():
    """Inside a running 2-rank job, a 64-rank virtual plan is priced by each rank alone: no process group is
    made for it (that would hang the job) and both ranks get the same figures."""
    import torch.distributed as dist

    model, batch = _mlp()
    big = (torch.randn(2048, 64), torch.randint(0, 8, (2048,)))
    mesh = sf.Mesh("cpu", (32, 2), names=("dp", "tp"), virtual=True)
    est = sf.plan(model, mesh, big, strategy="hybrid").estimate(model, big, device="a100")
    every: list[object] = [None, None]
    dist.all_gather_object(every, (est.peak_bytes, est.step_seconds))
    assert every[0] == every[1] and len(est.peak_bytes) == 64


def test_clear_errors():
    model, batch = _mlp()
    plan = sf.plan(model, sf.MeshSpec("cpu", (1,), ("dp",), (0,)), batch)
    with pytest.raises(ProfileError, match="shipped ones are a100, h100, h200"):
        plan.estimate(model, batch, device="h999")
    with pytest.raises(Exception, match="has 2 inputs, the example 1"):
        plan.estimate(model, batch[:1], device="h100")


def test_a_pipeline_is_its_stages_walked_by_its_schedule():
    """Two stages of an MLP, four micro-batches: the stages' compute adds up to the whole batch's matmuls
    (hand-counted; stage 1 also computes its input's gradient, to send back), and the schedule's span lies
    between the busiest stage's work and both stages' work run one after the other."""
    model, batch = _mlp()
    spec = sf.MeshSpec("cpu", (2,), ("pp",), (0, 1))
    plan = sf.plan(model, spec, batch, pipeline=sf.Pipeline(axis="pp", split_points=("net.2",), micro_batches=4))
    estimator = Estimator(model, batch, device=_profile(collectives=(LinkFit("send_recv", 2, 0.0, 1e30),)))
    est = estimator(plan)  # (messages between the stages free here)
    widths = [(64, 256), (256, 256), (256, 8)]
    forward = sum(2 * 32 * i * o for i, o in widths)
    backward = 2 * forward - 2 * 32 * 64 * 256
    times = [c.time for c in est.classes]
    assert [c.ranks for c in est.classes] == [(0,), (1,)] and estimator.lowerings == 2
    busy = [t.compute["forward"] + t.compute["backward"] for t in times]
    assert sum(busy) == pytest.approx((forward + backward) / 1e12, rel=1e-6)
    assert max(busy) < est.step_seconds < sum(busy)
    assert all(t.bubble > 0 for t in times)
    # more micro-batches of the same batch: a smaller bubble on the same work
    more = estimator(plan.replace(pipeline=dataclasses.replace(plan.pipeline, micro_batches=8)))
    assert more.step_seconds < est.step_seconds


def test_a_thousand_devices_in_a_pipeline_price_one_rank_per_stage():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=64))
    mesh = sf.Mesh("cuda", (4, 256), names=("pp", "dp"), virtual=True)
    x = torch.zeros((2048, 64), dtype=torch.long, device="meta")
    estimator = Estimator(model, (x, x), device="h100")
    est = estimator(sf.plan(model, mesh, (x, x), pipeline=sf.Pipeline(axis="pp", micro_batches=8)))
    assert len(est.peak_bytes) == 1024 and len(est.classes) == 4 and estimator.lowerings == 4
    assert sorted(len(c.ranks) for c in est.classes) == [256] * 4 and 0 < est.step_seconds < 10


def test_an_uncalibrated_machine_is_told_to_calibrate(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDFLOW_CACHE", str(tmp_path))
    with pytest.raises(ProfileError, match="shardflow calibrate"):
        device_profile(None)


def test_shipped_profiles_read_and_price_links_by_bus_factor():
    h100 = device_profile("h100")
    assert not h100.calibrated and h100.node_size == 8
    # a ring all-reduce of 1 GB on 8 GPUs moves 2·7/8 GB per GPU over the bus; 64 GPUs cross the network
    inside, across = h100.collective("all_reduce", 8, 1e9), h100.collective("all_reduce", 64, 1e9)
    fit = next(f for f in h100.collectives if f.kind == "all_reduce")
    assert inside == pytest.approx(fit.latency + 2 * 7 / 8 * 1e9 / fit.bus_bandwidth)
    assert across > 5 * inside
    assert math.isclose(h100.peak("bfloat16"), 989.4e12)
