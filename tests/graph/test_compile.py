"""sf.compile equals plain PyTorch: 5 AdamW steps with global-norm clipping on meshes (2,), (4,), (2, 2)
as dp, tp and hybrid, for the GPT, the MLP, the CNN with BatchNorm, and a model with a custom
autograd.Function (a straight-through estimator: the step must run its backward, not rounding's zero
derivative); losses and full_state_dict() within rtol 1e-4 (the fp32 equality policy), including a
global batch that does not divide."""

from __future__ import annotations

import copy

import pytest
import torch

import shardflow as sf
from shardflow.models import GPT, MLP, CNNConfig, GPTConfig, MLPConfig, SmallCNN
from shardflow.testing import run_on_ranks
from tests.runtime.custom_ops import Quantized

STEPS = 5


def _model_and_batches(kind: str, batch: int):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "gpt":
        model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16))
        data = [(torch.randint(0, 32, (batch, 8), generator=gen),) * 2 for _ in range(STEPS)]
        data = [(x, torch.roll(x, -1, 1)) for x, _ in data]
    elif kind in ("mlp", "ste"):
        model = MLP(MLPConfig(in_features=6, hidden_sizes=(16, 12), num_classes=5)) if kind == "mlp" else Quantized()
        data = [
            (torch.randn(batch, 6, generator=gen), torch.randint(0, 5, (batch,), generator=gen)) for _ in range(STEPS)
        ]
    else:
        model = SmallCNN(CNNConfig(in_channels=3, image_size=8, channels=(4, 6), num_classes=3))
        data = [
            (torch.randn(batch, 3, 8, 8, generator=gen), torch.randint(0, 3, (batch,), generator=gen))
            for _ in range(STEPS)
        ]
    return model, data


def reference_step(ref: torch.nn.Module, opt: torch.optim.Optimizer, x, y, clip: float = 0.5) -> float:  # type: ignore[no-untyped-def]
    """One plain PyTorch step (forward, backward, global-norm clipping, update); its loss."""
    loss = ref(x, y)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), clip, foreach=False)
    opt.step()
    return float(loss.item())


def train_and_compare(pm, ref: torch.nn.Module, opt: torch.optim.Optimizer, data) -> None:  # type: ignore[no-untyped-def]
    """Step ``pm`` and the serial reference on every batch: losses, then parameters, within the fp32 tolerances (rtol 1e-4, atol 1e-5)."""
    for x, y in data:
        want = reference_step(ref, opt, x, y)
        got = pm.step(x, y)
        assert abs(got - want) <= 1e-5 + 1e-4 * abs(want), (got, want)
    state = pm.full_state_dict()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _run(kind: str, mesh_shape, names, strategy: str, batch: int) -> None:
    model, data = _model_and_batches(kind, batch)
    ref = copy.deepcopy(model)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-6, foreach=False)
    mesh = sf.Mesh("cpu", mesh_shape, names=names)
    pm = sf.compile(
        model,
        mesh,
        example_inputs=data[0],
        strategy=strategy,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, foreach=False),
        max_grad_norm=0.5,
    )
    in_mesh = torch.distributed.get_rank() in mesh
    for step, (x, y) in enumerate(data):
        want = reference_step(ref, opt_ref, x, y)
        loss = pm.step(x, y)
        if in_mesh:
            assert abs(loss - want) <= 1e-5 + 1e-4 * abs(want), (step, loss, want)
    got = pm.full_state_dict()
    if in_mesh:
        want = ref.state_dict()
        assert set(got) == set(want)
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


CASES = [
    ("mlp", (2,), ("dp",), "dp", 7),
    ("mlp", (4,), ("dp",), "dp", 10),
    ("mlp", (2,), ("tp",), "tp", 6),
    ("mlp", (4,), ("tp",), "tp", 6),
    ("mlp", (2, 2), ("dp", "tp"), "hybrid", 5),
    ("gpt", (2,), ("dp",), "dp", 3),
    ("gpt", (4,), ("dp",), "dp", 4),
    ("gpt", (2,), ("tp",), "tp", 2),
    ("gpt", (4,), ("tp",), "tp", 2),
    ("gpt", (2, 2), ("dp", "tp"), "hybrid", 3),
    ("cnn", (2,), ("dp",), "dp", 5),
    ("cnn", (4,), ("dp",), "dp", 8),
    ("cnn", (2, 2), ("dp", "tp"), "hybrid", 6),
    ("ste", (2,), ("dp",), "dp", 6),
    ("ste", (2, 2), ("dp", "tp"), "hybrid", 6),
]


@pytest.mark.parametrize("kind, mesh_shape, names, strategy, batch", CASES)
def test_compile_equals_plain_torch(kind, mesh_shape, names, strategy, batch):
    run_on_ranks(4, _run, kind, mesh_shape, names, strategy, batch, timeout=300)
