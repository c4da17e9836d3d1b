"""ZeRO-3 as a layout: parameters (and so gradients and optimizer state) split on the data-parallel axis,
gathered right before each op that computes with them. Equal to serial PyTorch (5 AdamW steps with
clipping, CONTRACT.md's tolerances), and per-rank memory falls as the ZeRO paper's stage-3 formula says
(parameters + optimizer state = 12 bytes per parameter / N with fp32 AdamW; the gradients add 4/N)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import shardflow as sf
from shardflow.models import MLP, MLPConfig
from shardflow.testing import run_on_ranks
from shardflow.testing.memory import measure_step_peak
from tests.graph.test_compile import _model_and_batches, reference_step


def _adamw(ps):  # type: ignore[no-untyped-def]
    return torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, foreach=False)


def _equal_serial(kind: str, shape, names, strategy: str) -> list[str] | None:  # type: ignore[no-untyped-def]
    model, data = _model_and_batches(kind, 6)
    ref = copy.deepcopy(model)
    opt = _adamw(ref.parameters())
    mesh = sf.Mesh("cpu", shape, names=names)
    pm = sf.compile(model, mesh, example_inputs=data[0], strategy=strategy, zero=3, optimizer=_adamw, max_grad_norm=0.5)
    if torch.distributed.get_rank() not in mesh:  # the 4-rank pool runs 2-rank meshes too
        for x, y in data:
            pm.step(x, y)
        pm.full_state_dict()
        return None
    dp = names.index("dp")
    assert all(sbp[dp] == sf.S(0) for n, sbp in pm.layouts.items() if ref.get_parameter(n).dim() > 0)
    for x, y in data:
        want = reference_step(ref, opt, x, y)
        got = pm.step(x, y)
        assert abs(got - want) <= 1e-5 + 1e-4 * abs(want), (got, want)
    state = pm.full_state_dict()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    program = next(iter(pm.programs.values()))
    return [c.where for c in program.collectives]


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
        assert wheres.count("ZeRO-3 gather") > 0  # the plan gathers parameters itself, before use


def _memory(k: int) -> tuple[int, int, int]:
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=256, hidden_sizes=(1024, 1024), num_classes=16))
    data = (torch.randn(64, 256), torch.randint(0, 16, (64,)))
    mesh = sf.Mesh("cpu", (k,), names=("dp",))
    pm = sf.compile(model, mesh, example_inputs=data, zero=3)
    report = pm.memory()
    persistent = report.persistent["parameters"] + report.persistent["optimizer state"]
    pm.step(*data)
    measured, _ = measure_step_peak(pm, *data)
    return persistent, sum(p.numel() for p in model.parameters()), measured


def test_zero3_memory_follows_the_formula():
    two = run_on_ranks(2, _memory, 2)
    four = run_on_ranks(4, _memory, 4)
    for k, results in ((2, two), (4, four)):
        for persistent, psi, _ in results:
            # 12 bytes per parameter over k ranks; uneven splits of small tensors round a little
            assert abs(persistent - 12 * psi / k) <= 0.02 * 12 * psi / k, (k, persistent, psi)
    assert max(m for *_, m in four) < max(m for *_, m in two)  # measured peaks fall with more ranks
