"""ZeRO-3 as a layout: parameters (and so gradients and optimizer state) split on the data-parallel axis,
gathered right before each op that computes with them. Equal to serial PyTorch (5 AdamW steps with
clipping, the fp32 tolerances), and per-rank memory falls as the ZeRO paper's stage-3 formula says
(parameters + optimizer state = 12 bytes per parameter / N with fp32 AdamW; the gradients add 4/N)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import shardflow as sf
from shardflow.models import MLP, MLPConfig
from shardflow.testing import run_on_ranks
from shardflow.testing.memory import measure_step_peak, track_allocations
from tests.graph.test_compile import _model_and_batches, train_and_compare


def _adamw(ps):  # type: ignore[no-untyped-def]
    return torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, foreach=False)


def _equal_serial(kind: str, shape, names, strategy: str, zero: int = 3) -> list[str] | None:  # type: ignore[no-untyped-def]
    model, data = _model_and_batches(kind, 6)
    ref = copy.deepcopy(model)
    opt = _adamw(ref.parameters())
    mesh = sf.Mesh("cpu", shape, names=names)
    pm = sf.compile(
        model, mesh, example_inputs=data[0], strategy=strategy, zero=zero, optimizer=_adamw, max_grad_norm=0.5
    )
    if torch.distributed.get_rank() not in mesh:  # the 4-rank pool runs 2-rank meshes too
        for x, y in data:
            pm.step(x, y)
        pm.full_state_dict()
        return None
    dp = names.index("dp")
    if zero == 3:
        for n, sbp in pm.layouts.items():
            if any(isinstance(p, sf.Blocked) for p in sbp):  # c_attn under tp: its blocked dim is not split again
                assert sbp[dp] == (sf.S(1) if ref.get_parameter(n).dim() == 2 else sf.B), (n, sbp)
            elif ref.get_parameter(n).dim() > 0:
                assert sbp[dp] == sf.S(0), (n, sbp)
    else:  # parameters stay replicated on dp; the optimizer's pieces (state, gradients) are split there
        assert all(sbp[dp] == sf.B for sbp in pm.layouts.values())
        # every parameter but those whose every dim of size > 1 is split by tp already (column-parallel biases)
        split = [isinstance(sbp[dp], sf.S) for sbp in pm.opt_sbps]
        assert sum(split) >= len(split) * 2 // 3, pm.opt_sbps
    train_and_compare(pm, ref, opt, data)
    program = next(iter(pm.programs.values()))
    return [c.where for c in program.collectives] + [f"ops between: {n}" for n in _prefetch_gaps(program.source)]


def _prefetch_gaps(source: str) -> list[int]:
    """For every prefetched gather in a program's source: the compute lines between its launch and its use."""
    lines = source.splitlines()
    launched = {line.split(" = ")[0].strip(): i for i, line in enumerate(lines) if " = _start" in line}
    gaps = []
    for var, start in launched.items():
        end = next(i for i, line in enumerate(lines) if "_finish" in line and f"({var})" in line)
        gaps.append(sum(" = _op" in line or " = _local" in line for line in lines[start:end]))
    return gaps


@pytest.mark.parametrize(
    "kind, shape, names, strategy",
    [
        ("mlp", (2,), ("dp",), "dp"),
        ("gpt", (4,), ("dp",), "dp"),
        ("cnn", (2,), ("dp",), "dp"),
        ("gpt", (2, 2), ("dp", "tp"), "hybrid"),
    ],
)
def test_zero3_equals_plain_torch(kind, shape, names, strategy):
    results = [w for w in run_on_ranks(4, _equal_serial, kind, shape, names, strategy, timeout=300) if w is not None]
    assert len(results) == math.prod(shape)  # every rank of the mesh checked
    for wheres in results:
        # the plan gathers parameters itself, before use; most gathers are launched one op ahead (prefetched)
        prefetched, now = wheres.count("ZeRO-3 gather (prefetched)"), wheres.count("ZeRO-3 gather")
        gaps = [int(w.split(": ")[1]) for w in wheres if w.startswith("ops between")]
        if strategy == "dp":
            assert prefetched > now, (prefetched, now)
        assert prefetched > 0 and len(gaps) == prefetched and min(gaps) >= 1, (prefetched, gaps)


@pytest.mark.parametrize(
    "kind, shape, names, strategy, zero",
    [
        ("mlp", (2,), ("dp",), "dp", 1),
        ("gpt", (4,), ("dp",), "dp", 2),
        ("gpt", (2, 2), ("dp", "tp"), "hybrid", 2),
    ],
)
def test_zero1_and_zero2_equal_plain_torch(kind, shape, names, strategy, zero):
    results = [
        w for w in run_on_ranks(4, _equal_serial, kind, shape, names, strategy, zero, timeout=300) if w is not None
    ]
    assert len(results) == math.prod(shape)
    for wheres in results:
        assert "ZeRO-3 gather" not in wheres
        if zero == 2:  # gradients leave backward reduce-scattered into the optimizer's pieces, in buckets
            assert any(w.startswith("gradient reduce-scatter bucket") for w in wheres), wheres


def _memory(k: int, zero: int = 3) -> tuple[int, int, int]:
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=256, hidden_sizes=(1024, 1024), num_classes=16))
    data = (torch.randn(64, 256), torch.randint(0, 16, (64,)))
    mesh = sf.Mesh("cpu", (k,), names=("dp",))
    with track_allocations():
        pm = sf.compile(model, mesh, example_inputs=data, zero=zero)
        report = pm.memory()
        pm.step(*data)
        # every tensor byte the rank holds between steps, counted by the allocator from before compile
        held = measure_step_peak(pm, *data).held
    persistent = report.persistent["parameters"] + report.persistent["optimizer state"]
    psi = sum(p.numel() for p in model.parameters())
    if zero < 3:
        return report.persistent["optimizer state"], report.program.gradients, psi, held  # type: ignore[return-value]
    return persistent, psi, held


def test_zero3_memory_follows_the_formula():
    """Predicted parameters + optimizer state: 12 bytes per parameter / N; measured between steps
    (parameters, gradients, optimizer state): 16 / N. Uneven splits of small tensors round a little. The
    peaks of ZeRO steps are checked with every other plan's in tests/graph/test_memory.py."""
    for k in (2, 4):
        for persistent, psi, held in run_on_ranks(k, _memory, k):
            assert abs(persistent - 12 * psi / k) <= 0.02 * 12 * psi / k, (k, persistent, psi)
            assert abs(held - 16 * psi / k) <= 0.02 * 16 * psi / k, (k, held, psi)


def test_zero1_and_zero2_memory_follow_the_formulas():
    """fp32 AdamW: optimizer state 8 bytes per parameter / N under both; gradients 4 bytes per parameter
    under ZeRO-1 (all-reduced whole) and 4 / N under ZeRO-2 (reduce-scattered); predicted, and measured
    between steps (4 + 4 + 8 / N and 4 + 12 / N bytes per parameter with the parameters)."""
    for zero in (1, 2):
        for k in (2, 4):
            for state, grads, psi, held in run_on_ranks(k, _memory, k, zero):
                assert abs(state - 8 * psi / k) <= 0.02 * 8 * psi / k, (zero, k, state, psi)
                want = 4 * psi / (k if zero == 2 else 1)
                assert abs(grads - want) <= 0.02 * want, (zero, k, grads, psi)
                total = 4 * psi + want + 8 * psi / k
                assert abs(held - total) <= 0.02 * total, (zero, k, held, total)
