"""``inductor=True``: one device's program compiled by torch.compile trains as plain PyTorch does, and is
refused where its collectives or early updates would be traced around."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

import shardflow as sf
from tests.graph.test_compile import _model_and_batches, reference_step


def test_compiled_program_equals_plain_torch():
    model, data = _model_and_batches("gpt", 4)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-6)
    pm = sf.compile(
        model,
        sf.Mesh("cpu", (1,)),
        example_inputs=data[0],
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-6),
        max_grad_norm=0.5,
        inductor=True,
    )
    torch._dynamo.utils.counters.clear()
    for x, y in data:
        want = reference_step(ref, opt, x, y)
        got = pm.step(x, y)
        assert abs(got - want) <= 1e-5 + 1e-4 * abs(want), (got, want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # compiled once, not op by op or per step
    state = pm.full_state_dict()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_inductor_refused_where_programs_communicate():
    model, data = _model_and_batches("mlp", 4)
    with pytest.raises(ValueError, match="inductor=True compiles one device's program; .* has 2 devices"):
        sf.compile(model, sf.Mesh("cpu", (2,)), example_inputs=data[0], inductor=True)
    pm = sf.compile(model, sf.Mesh("cpu", (1,)), example_inputs=data[0], inductor=True)
    pm.updates = "inline"
    with pytest.raises(ValueError, match="pm.updates is 'inline': set it to 'after'"):
        pm.step(*data[0])
