"""A compiled step on one GPU equals plain PyTorch on it (the CUDA kernels trace to other ATen ops than the
CPU ones: attention to the memory-efficient kernel). Runs with ``-m gpu`` on a machine with a device; skips,
naming why, without one."""

from __future__ import annotations

import copy

import pytest
import torch

import shardflow as sf
from tests.graph.test_compile import _model_and_batches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("arena", [False, "all"])
def test_compiled_gpt_on_one_gpu_equals_plain_torch(arena):
    model, data = _model_and_batches("gpt", 6)
    ref = copy.deepcopy(model).cuda()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-6)
    pm = sf.compile(
        model,
        sf.Mesh("cuda", (1,)),
        example_inputs=data[0],
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-6),
        max_grad_norm=0.5,
        arena=arena,
    )
    for x, y in data:
        loss = ref(x.cuda(), y.cuda())  # the reference step, then shardflow's on the same batch
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        got = pm.step(x, y)
        want = float(loss.detach())
        assert abs(got - want) <= 1e-5 + 1e-4 * abs(want), (got, want)
    state = pm.full_state_dict()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(state[name].cpu(), value.cpu(), rtol=1e-4, atol=1e-5, msg=name)
