"""Eager training on GlobalTensors equals plain PyTorch: parameters laid out from outside (model code
untouched), AdamW with global-norm clipping, 3 steps, data parallel / Megatron tensor parallel / both,
with a global batch that does not divide over the data-parallel ranks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import shardflow as sf
from shardflow.testing import run_on_ranks


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.fc2(torch.relu(self.fc1(x))), y)


def _layouts(mesh: sf.Mesh, strategy: str) -> tuple[dict[str, tuple], tuple]:
    dp = "dp" in mesh.names and strategy in ("dp", "hybrid")
    tp = "tp" in mesh.names and strategy in ("tp", "hybrid")
    axis_of = {n: i for i, n in enumerate(mesh.names)}

    def on(axis: str, p: object) -> tuple:
        out = [sf.B] * mesh.ndim
        if axis in axis_of:
            out[axis_of[axis]] = p
        return tuple(out)

    if tp:  # Megatron: fc1 column-parallel (weight rows, bias split), fc2 row-parallel (weight columns)
        params = {"fc1.weight": on("tp", sf.S(0)), "fc1.bias": on("tp", sf.S(0)), "fc2.weight": on("tp", sf.S(1))}
    else:
        params = {}
    data = on("dp", sf.S(0)) if dp else (sf.B,) * mesh.ndim
    return params, data


def _train(mesh_shape: tuple[int, ...], names: tuple[str, ...], strategy: str, batch: int) -> None:
    torch.manual_seed(0)
    model = _MLP()
    ref = copy.deepcopy(model)
    mesh = sf.Mesh("cpu", mesh_shape, names=names)
    if torch.distributed.get_rank() not in mesh:
        return  # nothing of this job lives here (the mesh takes the first ranks of the pool)
    params, data_sbp = _layouts(mesh, strategy)
    for name, p in list(model.named_parameters()):
        mod_name, attr = name.rsplit(".", 1)
        sbp = params.get(name, (sf.B,) * mesh.ndim)
        setattr(model.get_submodule(mod_name), attr, nn.Parameter(sf.distribute(p.detach(), mesh, sbp)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6, foreach=False)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-6, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x, y = torch.randn(batch, 6, generator=gen), torch.randint(0, 5, (batch,), generator=gen)
        loss_ref = ref(x, y)
        opt_ref.zero_grad()
        loss_ref.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5, foreach=False)
        opt_ref.step()

        gx, gy = sf.distribute(x, mesh, data_sbp), sf.distribute(y, mesh, data_sbp)
        loss = model(gx, gy).full()  # the logical loss on every rank
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=False)
        opt.step()
        torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5, msg=f"loss of step {step}")
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and p.grad.sbp == sf.placement.grad_sbp(p.sbp), name
        torch.testing.assert_close(p.full(), q.detach(), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "mesh_shape, names, strategy, batch",
    [
        ((2,), ("dp",), "dp", 7),
        ((4,), ("dp",), "dp", 9),
        ((2,), ("tp",), "tp", 8),
        ((4,), ("tp",), "tp", 8),
        ((2, 2), ("dp", "tp"), "hybrid", 7),
    ],
)
def test_eager_training_equals_plain_torch(mesh_shape, names, strategy, batch):
    run_on_ranks(4, _train, mesh_shape, names, strategy, batch)
