"""Gradient buckets: with small buckets, all-reduces start during backward (before it ends), and the
result still equals plain PyTorch."""

from __future__ import annotations

import copy

import torch

import shardflow as sf
from shardflow.models import MLP, MLPConfig
from shardflow.tensor import grad_sync
from shardflow.testing import run_on_ranks


def _run() -> tuple[int, int]:
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=6, hidden_sizes=(16, 16, 16), num_classes=4))
    ref = copy.deepcopy(model)
    x, y = torch.randn(6, 6), torch.randint(0, 4, (6,))
    mesh = sf.Mesh("cpu", (4,), names=("dp",))
    make = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    pm = sf.compile(model, mesh, example_inputs=(x, y), strategy="dp", optimizer=make)
    pm.bucket_bytes = 1  # every gradient is its own bucket
    events: list[str] = []
    launch, finish = grad_sync.GradSync._launch, grad_sync.GradSync.finish

    def spy_launch(self, bucket):  # type: ignore[no-untyped-def]
        events.append("launch")
        return launch(self, bucket)

    def spy_finish(self):  # type: ignore[no-untyped-def]
        events.append("finish")
        return finish(self)

    grad_sync.GradSync._launch, grad_sync.GradSync.finish = spy_launch, spy_finish
    try:
        loss = pm.step(x, y)
    finally:
        grad_sync.GradSync._launch, grad_sync.GradSync.finish = launch, finish
    opt = make(ref.parameters())
    want = ref(x, y)
    want.backward()
    opt.step()
    assert abs(loss - want.item()) < 1e-5
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(pm.full_state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    return events.index("finish"), len(list(model.parameters()))


def test_buckets_start_during_backward():
    for launched_before_finish, n_params in run_on_ranks(4, _run):
        assert launched_before_finish == n_params  # every bucket left before backward ended
