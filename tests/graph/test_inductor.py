"""``inductor=True``: each rank's program compiled by torch.compile trains as plain PyTorch does, on one
device (one graph) and on ranks that communicate (graph breaks at the messages, compiled once), and is
refused with ZeRO-3, whose prefetch handles would recompile it at every step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch._dynamo

import shardflow as sf
from shardflow.testing import run_on_ranks
from tests.graph.test_compile import _model_and_batches, reference_step


def _train(kind: str, mesh: sf.Mesh, strategy: str, batch: int, zero: int = 0) -> tuple[int, int]:
    """Five steps against plain PyTorch; the number of compiled graphs after the second step (the first
    compiled one) and after the last."""
    model, data = _model_and_batches(kind, batch)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-6)
    pm = sf.compile(
        model,
        mesh,
        example_inputs=data[0],
        strategy=strategy,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-6),
        max_grad_norm=0.5,
        zero=zero,
        inductor=True,
    )
    torch._dynamo.utils.counters.clear()
    graphs = []
    for x, y in data:
        want = reference_step(ref, opt, x, y)
        got = pm.step(x, y)
        assert abs(got - want) <= 1e-5 + 1e-4 * abs(want), (got, want)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    state = pm.full_state_dict()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    return graphs[1], graphs[-1]


def test_compiled_program_equals_plain_torch():
    assert _train("gpt", sf.Mesh("cpu", (1,)), "dp", 4) == (1, 1)  # one graph, compiled once


def _on_rank(kind: str, shape: tuple[int, ...], names: tuple[str, ...], strategy: str, batch: int, zero: int):
    return _train(kind, sf.Mesh("cpu", shape, names=names), strategy, batch, zero)


@pytest.mark.parametrize(
    "kind, shape, names, strategy, batch, zero",
    [
        ("gpt", (2,), ("dp",), "dp", 4, 0),
        ("gpt", (2,), ("dp",), "dp", 3, 2),  # uneven shards (ranks compile different graphs), ZeRO-2
        ("gpt", (2,), ("tp",), "tp", 4, 0),
        ("mlp", (2, 2), ("dp", "tp"), "hybrid", 4, 0),
    ],
)
def test_compiled_programs_on_ranks_equal_plain_torch(kind, shape, names, strategy, batch, zero):
    """The programs launch gradient buckets and release units to the update actors mid-backward (graph
    breaks) and box between layouts (collectives traced in the graph); the pieces compile once."""
    ranks = math.prod(shape)
    for after_first, after_last in run_on_ranks(
        ranks, _on_rank, kind, shape, names, strategy, batch, zero, timeout=300
    ):
        assert after_first > 1  # split at the messages
        assert after_last == after_first  # no step recompiles


def test_inductor_refused_with_zero3():
    model, data = _model_and_batches("mlp", 4)
    with pytest.raises(ValueError, match="inductor=True with zero=3: .* use zero=1 or 2, or inductor=False"):
        sf.compile(model, sf.Mesh("cpu", (1,)), example_inputs=data[0], inductor=True, zero=3)
