"""A compiled step on one GPU equals plain PyTorch on it (the CUDA kernels trace to other ATen ops than the
CPU ones: attention to the memory-efficient kernel). Runs with ``-m gpu`` on a machine with a device; skips,
naming why, without one."""

from __future__ import annotations

import copy

import pytest
import torch

import shardflow as sf
from shardflow.models import GPT, GPTConfig
from tests.graph.test_compile import _model_and_batches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _adamw(params):  # type: ignore[no-untyped-def]
    return torch.optim.AdamW(params, lr=1e-2, eps=1e-6)


def _step_both(pm, ref, opt, x, y, clip=None) -> None:  # type: ignore[no-untyped-def]
    """Plain PyTorch's step on the GPU, then shardflow's on the same batch: the losses agree."""
    loss = ref(x.cuda(), y.cuda())
    opt.zero_grad()
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
    opt.step()
    got, want = pm.step(x, y), float(loss.detach())
    assert abs(got - want) <= 1e-5 + 1e-4 * abs(want), (got, want)


def _assert_same_state(pm, ref) -> None:  # type: ignore[no-untyped-def]
    state = pm.full_state_dict()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(state[name].cpu(), value.cpu(), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arena", [False, "all"])
def test_compiled_gpt_on_one_gpu_equals_plain_torch(arena):
    model, data = _model_and_batches("gpt", 6)
    ref = copy.deepcopy(model).cuda()
    opt = _adamw(ref.parameters())
    mesh = sf.Mesh("cuda", (1,))
    pm = sf.compile(model, mesh, example_inputs=data[0], optimizer=_adamw, max_grad_norm=0.5, arena=arena)
    for x, y in data:
        _step_both(pm, ref, opt, x, y, clip=0.5)
    _assert_same_state(pm, ref)


@pytest.mark.parametrize("batch", [6, 640])  # 640 x 8 = 5120 indices: CUDA's embedding backward then syncs
def test_cuda_graph_replay_equals_plain_torch(batch):
    """``cuda_graphs=True``: two warm-up steps, then the step (clipping and AdamW included) captured and
    replayed; a new learning rate is captured anew. Losses every step and the final state equal plain
    PyTorch's."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=32))
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(8):
        x = torch.randint(0, 64, (batch, 8), generator=gen)
        data.append((x, torch.roll(x, -1, 1)))
    ref = copy.deepcopy(model).cuda()
    opt = _adamw(ref.parameters())
    mesh = sf.Mesh("cuda", (1,))
    pm = sf.compile(model, mesh, example_inputs=data[0], optimizer=_adamw, max_grad_norm=0.5, cuda_graphs=True)
    clip = 0.5
    for i, (x, y) in enumerate(data):
        if i == 5:  # a float lr is baked into the captured update: the step is captured again
            for o in (opt, pm.optimizer):
                for group in o.param_groups:
                    group["lr"] = 3e-3
        if i == 7:  # so is the clipping norm
            clip = pm.max_grad_norm = 0.05
        _step_both(pm, ref, opt, x, y, clip=clip)
    (graphed,) = pm.graphs.values()
    assert (graphed.captures, graphed.replays) == (3, len(data) - 2)
    assert all(g["capturable"] for g in pm.optimizer.param_groups)
    _assert_same_state(pm, ref)


def test_cuda_graph_recaptures_after_the_optimizer_state_is_replaced():
    """An optimizer state loaded back from an earlier step (new tensors, host step counts) is moved and
    captured anew, not replayed from stale addresses: training goes on as plain PyTorch's, which loads the
    same earlier state."""
    model, data = _model_and_batches("mlp", 6)
    ref = copy.deepcopy(model).cuda()
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    adam = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731
    pm = sf.compile(model, sf.Mesh("cuda", (1,)), example_inputs=data[0], optimizer=adam, cuda_graphs=True)
    earlier = None
    for i, (x, y) in enumerate(data + data):
        if i == 3:
            earlier = copy.deepcopy(pm.optimizer.state_dict()), copy.deepcopy(opt.state_dict())
        if i == 6:  # both optimizers go back to their state of step 3; the parameters stay
            saved, ref_saved = earlier
            saved["param_groups"] = [dict(g, capturable=False) for g in saved["param_groups"]]
            for s in saved["state"].values():
                s["step"] = s["step"].cpu()  # as an optimizer saved without capturable holds them
            pm.optimizer.load_state_dict(saved)
            opt.load_state_dict(ref_saved)
        _step_both(pm, ref, opt, x, y)
    (graphed,) = pm.graphs.values()
    assert graphed.captures == 2
    assert all(s["step"].is_cuda for s in pm.optimizer.state.values())


def test_inductor_program_replayed_as_cuda_graph_equals_plain_torch():
    """``inductor=True`` with ``cuda_graphs=True``: the program compiled in the second warm-up step, then
    Inductor's kernels captured and replayed; losses and state as plain PyTorch's."""
    model, data = _model_and_batches("gpt", 6)
    ref = copy.deepcopy(model).cuda()
    opt = _adamw(ref.parameters())
    mesh = sf.Mesh("cuda", (1,))
    pm = sf.compile(model, mesh, example_inputs=data[0], optimizer=_adamw, cuda_graphs=True, inductor=True)
    for x, y in data:
        _step_both(pm, ref, opt, x, y)
    (graphed,) = pm.graphs.values()
    assert (graphed.captures, graphed.replays) == (1, len(data) - 2)
    _assert_same_state(pm, ref)


def test_cuda_graph_gradients_follow_the_graph_replayed():
    """Two batch shapes (two graphs) and an optimizer that cannot be captured (Adagrad: it updates after
    each replay, from the gradients that replay wrote), with ``zero_grad`` between steps as plain PyTorch
    users write it: training equals plain PyTorch's."""
    model, _ = _model_and_batches("mlp", 4)
    gen = torch.Generator().manual_seed(2)
    sizes = [8, 8, 8, 5, 8, 5, 8, 5, 5, 8]
    batches = [(torch.randn(n, 6, generator=gen), torch.randint(0, 5, (n,), generator=gen)) for n in sizes]
    ref = copy.deepcopy(model).cuda()
    opt = torch.optim.Adagrad(ref.parameters(), lr=0.05)
    pm = sf.compile(
        model,
        sf.Mesh("cuda", (1,)),
        example_inputs=batches[0],
        optimizer=lambda ps: torch.optim.Adagrad(ps, lr=0.05),
        cuda_graphs=True,
    )
    for x, y in batches:
        _step_both(pm, ref, opt, x, y)
        pm.optimizer.zero_grad()
    assert pm.graph_update is False  # Adagrad has no capturable mode: its update ran after each replay
    assert sorted(g.captures for g in pm.graphs.values()) == [1, 1]
    _assert_same_state(pm, ref)
