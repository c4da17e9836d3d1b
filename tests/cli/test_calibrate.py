"""shardflow calibrate: one quick calibration on 2 ranks gives a complete profile whose figures agree with
timings made independently here (the meter's matmul probe, plain torch.distributed all-reduces), survives
JSON, and the CLI saves and prints it."""

from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

import shardflow as sf
from shardflow.cli.calibrate import _fit, calibrate
from shardflow.cli.launch import _threads_per_worker
from shardflow.cli.main import main
from shardflow.cli.step_fits import _nonnegative_fit, _solve, in_step_cases
from shardflow.cost.profile import KINDS, OP_CLASSES, bus_factor, device_profile, save
from shardflow.runtime.meter import probe
from shardflow.testing import run_on_ranks
from shardflow.testing.memory import memory_case


@pytest.fixture(scope="module")
def profile():
    return calibrate(ranks=2, quick=True)


def test_every_op_class_has_a_rate_and_the_machine_its_share(profile):
    for op_class in OP_CLASSES:
        assert profile.flops[op_class]["float32"] > 0, op_class
    assert profile.memory_bandwidth > 0 and 0 <= profile.launch < 1e-3
    assert 0.5 < profile.kernel_scale < 3, profile.kernel_scale  # ops in a step run near their time alone
    assert profile.calibrated and profile.device_type == "cpu" and profile.threads >= 1
    assert profile.node_size >= 2 and profile.memory_bytes > 0
    assert "quick" in profile.source and "2 gloo rank(s)" in profile.source


def test_matmul_rate_agrees_with_the_meter_probe(profile):
    before = torch.get_num_threads()
    torch.set_num_threads(profile.threads)  # the probe measures what one of the 2 ranks gets, as calibrate did
    try:
        measured = probe("cpu", torch.float32, seconds=0.2)
    finally:
        torch.set_num_threads(before)
    assert measured / 10 < profile.flops["matmul"]["float32"] < measured * 10


def test_every_kind_is_fitted_on_two_ranks(profile):
    for kind in KINDS:
        fits = [f for f in profile.collectives if f.kind == kind and f.ranks == 2]
        assert len(fits) == 1, kind
        assert fits[0].latency >= 1e-6 and fits[0].bus_bandwidth > 0, fits[0]


def test_the_fit_recovers_latency_and_bandwidth():
    points = [(n, 50e-6 + bus_factor("all_reduce", 4) * n / 2e9) for n in (1 << 10, 1 << 16, 1 << 20, 1 << 24)]
    fit = _fit("all_reduce", 4, points)
    assert fit.latency == pytest.approx(50e-6, rel=1e-6) and fit.bus_bandwidth == pytest.approx(2e9, rel=1e-6)
    assert _fit("all_gather", 2, [(1 << 10, 1e-5), (1 << 20, 1e-2)]).latency == 1e-6  # under 1 µs: clamped
    noise = _fit("all_gather", 2, [(1 << 10, 2e-3), (1 << 12, 1e-3)])  # slower at the smaller size
    assert noise.bus_bandwidth == pytest.approx(2048 / 1e-3)  # the largest size's rate, not a negative one


def test_solve_finds_the_cost_that_makes_estimates_meet_measurements():
    """``_solve`` on estimates that grow with a cost as the walk's do (linearly, then faster once the cost
    stops hiding behind compute) recovers the cost two measurements were made with; where one plan's cost
    shows only beyond 0.3 ms, it finds the least-squares cost a fine brute-force search finds (a slope at 0
    would not see that plan move), in relative error; and it answers 0 where the measurements are below the cost-free estimates."""

    def estimates(t: float) -> list[float]:
        return [0.010 + 4 * t, 0.020 + 3 * t + 5 * max(t - 2e-4, 0.0)]

    assert _solve(estimates, estimates(5e-4), quick=False)[1] == pytest.approx(5e-4, rel=0.02)

    def hidden(t: float) -> list[float]:
        return [0.01 + 5 * max(t - 3e-4, 0.0), 0.02 + t]

    measured = [0.0106, 0.0202]
    grid = np.linspace(0, 5e-3, 50_001)
    fine = min((sum(((e - m) / m) ** 2 for e, m in zip(hidden(t), measured)), t) for t in grid)[1]
    assert _solve(hidden, measured, quick=False)[1] == pytest.approx(fine, rel=0.02)
    assert _solve(estimates, [0.009, 0.019], quick=True)[1] == 0.0


def test_the_in_step_figures_are_fitted_on_every_rank_of_the_job():
    """A job's in-step costs are fitted on plans over all its ranks, with blocking boxings among them: tensor
    parallel alone on 2 ranks, beside data parallel (pairs) on 4; an odd count has no pairs."""
    for ranks in (2, 3, 4):
        cases = in_step_cases(ranks)
        assert all(np.prod(c.shape) == ranks and len(c.names) == len(c.shape) for c in cases), cases
        assert any(c.options.get("zero") == 3 for c in cases)
        tensor = [c for c in cases if c.options.get("strategy") in ("tp", "hybrid")]
        assert [c.shape for c in tensor] == ({2: [(2,)] * 2, 3: [], 4: [(2, 2)] * 2}[ranks]), tensor


def test_the_runtime_fit_recovers_scale_launch_and_overhead():
    """Steps made of ops, lines and a per-step cost (seconds, as calibrate's columns) give back the three
    coefficients; where the best unconstrained fit has a negative per-step cost, it is 0 and the others are
    refitted (a fit that lets it go negative would price an empty step below nothing)."""
    ops, lines = np.array([0.2e-3, 2e-3, 3e-3, 6e-3, 14e-3, 4e-3]), np.array([40.0, 160, 270, 490, 270, 40])
    columns = np.stack([ops, lines, np.ones_like(ops)], axis=1)
    assert _nonnegative_fit(columns, columns @ [1.2, 8e-6, 1e-4]) == pytest.approx((1.2, 8e-6, 1e-4), rel=1e-6)
    measured = columns @ [1.1, 9e-6, -2e-4]
    scale, launch, overhead = _nonnegative_fit(columns, measured)
    two = columns[:, :2] / measured[:, None]  # the same fit in relative error without the per-step column
    assert overhead == 0 and (scale, launch) == pytest.approx(np.linalg.lstsq(two, np.ones(6), rcond=None)[0])


def _step_seconds(steps: int, threads: int) -> float:
    """On each rank: the median seconds of a 2-rank data-parallel step of the memory tests' MLP."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, batch = memory_case("mlp")
        pm = sf.compile(model, sf.Mesh("cpu", (2,), names=("dp",)), batch)
        for _ in range(3):
            pm.step(*batch)
        times = []
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            pm.step(*batch)
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        torch.set_num_threads(before)


def test_the_profile_prices_a_real_step_it_was_not_fitted_on(profile):
    """The fitted figures (launch, per step, in-step, overlap) come from small models of calibrate's own; a
    data-parallel step of another model, measured here, is predicted within a factor of 2 either way (the
    cost-model benchmark measures the error itself, 10-30%; this guards against a fit gone wrong)."""
    measured = max(run_on_ranks(2, _step_seconds, 15, profile.threads))
    model, batch = memory_case("mlp")
    plan = sf.plan(model, sf.MeshSpec("cpu", (2,), ("dp",), (0, 1)), batch)
    predicted = plan.estimate(model, batch, device=profile).step_seconds
    assert measured / 2 < predicted < measured * 2, (predicted, measured)


def _plain_all_reduce(nbytes: int, reps: int, threads: int) -> float:
    """On each rank: median seconds of torch.distributed's own all-reduce, each after a barrier."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(nbytes // 4)
        dist.all_reduce(x)
        times = []
        for _ in range(reps):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        torch.set_num_threads(before)


def test_predicted_all_reduce_agrees_with_a_fresh_measurement(profile):
    nbytes = 4 << 20
    measured = max(run_on_ranks(2, _plain_all_reduce, nbytes, 9, profile.threads))
    links = dataclasses.replace(profile, in_step=0.0, link_scale=1.0)  # a call after a barrier, not in a step
    predicted = links.collective("all_reduce", 2, nbytes)
    assert measured / 3 < predicted < measured * 3, (predicted, measured)


def test_profile_round_trips_through_json(profile, tmp_path, monkeypatch):
    assert device_profile(str(save(profile, tmp_path / "elsewhere.json"))) == profile
    monkeypatch.setenv("SHARDFLOW_CACHE", str(tmp_path / "cache"))
    save(profile)
    assert device_profile(None) == profile  # this machine's, as the cost model reads it


def test_cli_calibrates_prints_and_saves(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHARDFLOW_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mine.json"
    # one rank: the links and the 2-rank fits are the fixture's (the module's other tests); this is the command
    assert main(["calibrate", "--quick", "--ranks", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FLOP/s" in printed and "GB/s" in printed and "per step" in printed and f"saved to {out}" in printed
    saved = device_profile(str(out))
    assert saved.calibrated and saved.threads == _threads_per_worker(1) and not saved.collectives
    assert not (tmp_path / "cache").exists()  # --out: this machine's cached profile is left as it was


def test_cli_errors_are_messages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--ranks", "0"])
    assert e.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["calibrate", "--device", "cuda"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
