"""Gradient buckets: with small buckets, all-reduces start during backward (before it ends), and the
result still equals plain PyTorch; in eager mode (hooks and GradSync) and in the static program (buckets
launched by generated code, seen from a dispatch mode that logs every ATen op the step runs)."""

from __future__ import annotations

import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import shardflow as sf
from shardflow.graph.ir import buckets, codegen
from shardflow.models import MLP, MLPConfig
from shardflow.tensor import grad_sync
from shardflow.testing import run_on_ranks


def _setup():  # type: ignore[no-untyped-def]
    """An MLP on 4 dp ranks whose every gradient is its own bucket, and a plain copy of it."""
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=6, hidden_sizes=(16, 16, 16), num_classes=4))
    ref = copy.deepcopy(model)
    x, y = torch.randn(6, 6), torch.randint(0, 4, (6,))
    mesh = sf.Mesh("cpu", (4,), names=("dp",))
    make = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    pm = sf.compile(model, mesh, example_inputs=(x, y), strategy="dp", optimizer=make)
    pm.bucket_bytes = 1
    return model, ref, x, y, make, pm


def _run_eager() -> tuple[int, int]:
    model, ref, x, y, make, pm = _setup()
    pm.static = False
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
    _check_equal(ref, make, x, y, loss, pm)
    return events.index("finish"), len(list(model.parameters()))


def _check_equal(ref, make, x, y, loss, pm) -> None:  # type: ignore[no-untyped-def]
    opt = make(ref.parameters())
    want = ref(x, y)
    want.backward()
    opt.step()
    assert abs(loss - want.item()) < 1e-5
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(pm.full_state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


class _Log(TorchDispatchMode):
    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.events.append(str(func))
        return func(*args, **(kwargs or {}))


def _run_static() -> tuple[int, int, int]:
    model, ref, x, y, make, pm = _setup()
    events: list[str] = []
    launch, wait = buckets.launch_all_reduce, codegen.wait_bucket

    def spy_launch(*args):  # type: ignore[no-untyped-def]
        events.append("launch")
        return launch(*args)

    def spy_wait(handle):  # type: ignore[no-untyped-def]
        events.append("wait")
        return wait(handle)

    buckets.launch_all_reduce, codegen.wait_bucket = spy_launch, spy_wait  # bound into the program when it is lowered
    try:
        pm.program(pm._inputs((x, y)))
    finally:
        buckets.launch_all_reduce, codegen.wait_bucket = launch, wait
    with _Log(events):
        loss = pm.step(x, y)
    _check_equal(ref, make, x, y, loss, pm)
    first, last = events.index("launch"), events.index("wait")
    compute_between = sum(e.startswith("aten.mm") or e.startswith("aten.threshold") for e in events[first:last])
    return events.count("launch"), compute_between, len(list(model.parameters()))


def test_buckets_start_during_backward_eager():
    for launched_before_finish, n_params in run_on_ranks(4, _run_eager):
        assert launched_before_finish == n_params  # every bucket left before backward ended


def test_buckets_start_during_backward_static():
    for launches, compute_between, n_params in run_on_ranks(4, _run_static):
        assert launches == n_params
        # backward matmuls of earlier layers run after the first bucket left and before any wait
        assert compute_between >= 4, compute_between
