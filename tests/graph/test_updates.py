"""A compiled step as an actor graph: each gradient unit's all-reduce and optimizer update run as actors,
released by the program once the unit's gradients exist and nothing later reads its parameters.

Parallel equals serial without clipping (so updates really run during backward) for dp, tp, hybrid and
ZeRO plans, both inline at the release points (deterministic: the earliest an update can run, which proves
the release points safe) and on the actor threads; the program releases units before backward ends; a
traced step shows compute, all-reduce and optimizer tracks; an update that raises is raised naming its
actor, not a hang."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

import shardflow as sf
from shardflow.runtime.actors import ActorError
from shardflow.testing import run_on_ranks

from .test_compile import _model_and_batches


def _opt(params):  # type: ignore[no-untyped-def]
    return torch.optim.AdamW(params, lr=1e-2, eps=1e-6, foreach=False)


def _equal(kind: str, mesh_shape, names, strategy: str, batch: int, zero: int, updates: str) -> int:  # type: ignore[no-untyped-def]
    model, data = _model_and_batches(kind, batch)
    ref = copy.deepcopy(model)
    opt_ref = _opt(ref.parameters())
    mesh = sf.Mesh("cpu", mesh_shape, names=names)
    pm = sf.compile(model, mesh, example_inputs=data[0], strategy=strategy, optimizer=_opt, zero=zero)
    pm.updates = updates
    if torch.distributed.get_rank() not in mesh:
        return -1  # ranks outside a 2-rank mesh hold nothing and step nothing
    for step, (x, y) in enumerate(data):
        loss = ref(x, y)
        opt_ref.zero_grad()
        loss.backward()
        opt_ref.step()
        got = pm.step(x, y)
        assert abs(got - loss.item()) <= 1e-5 + 1e-4 * abs(loss.item()), (step, got, loss.item())
    state = pm.full_state_dict()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    program = next(iter(pm.programs.values()))
    return len(program.units)


CASES = [
    ("mlp", (2,), ("dp",), "dp", 7, 0),
    ("gpt", (4,), ("dp",), "dp", 4, 0),
    ("gpt", (2,), ("tp",), "tp", 2, 0),
    ("gpt", (2, 2), ("dp", "tp"), "hybrid", 3, 0),
    ("cnn", (2,), ("dp",), "dp", 5, 0),
    ("mlp", (2,), ("dp",), "dp", 6, 1),
    ("gpt", (2, 2), ("dp", "tp"), "hybrid", 4, 2),
    ("gpt", (4,), ("dp",), "dp", 4, 3),
]


# every case with updates at their release points (inline) and by the CPU event loop; four on threads
RUNS = [(*c, u) for c in CASES for u in ("inline", "loop")] + [(*CASES[i], "actors") for i in (0, 3, 5, 7)]


@pytest.mark.parametrize("kind, mesh_shape, names, strategy, batch, zero, updates", RUNS)
def test_updates_during_backward_equal_plain_torch(kind, mesh_shape, names, strategy, batch, zero, updates):
    units = run_on_ranks(4, _equal, kind, mesh_shape, names, strategy, batch, zero, updates, timeout=300)
    assert max(units) >= 1 and min(units) >= -1


class _ReadAfterGrad(torch.nn.Module):
    """``h @ mix``: autograd's mm backward computes the second operand's gradient first, then reads
    ``mix`` again for ``h``'s gradient, so an update released with ``mix``'s gradient would corrupt it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(6, 8)
        self.mix = torch.nn.Parameter(torch.eye(8) + 0.1 * torch.randn(8, 8))
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x)) @ self.mix
        return torch.nn.functional.cross_entropy(self.out(h), y)


def _read_after_grad() -> None:
    torch.manual_seed(0)
    model = _ReadAfterGrad()
    ref = copy.deepcopy(model)
    opt_ref = _opt(ref.parameters())
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
    mesh = sf.Mesh("cpu", (2,), names=("dp",))
    pm = sf.compile(model, mesh, example_inputs=data[0], strategy="dp", optimizer=_opt)
    pm.bucket_bytes, pm.updates = 1, "inline"  # one unit per gradient, updated the moment it is released
    for x, y in data:
        loss = ref(x, y)
        opt_ref.zero_grad()
        loss.backward()
        opt_ref.step()
        assert abs(pm.step(x, y) - loss.item()) <= 1e-5 + 1e-4 * abs(loss.item())
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(pm.full_state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_parameter_read_after_its_gradient_is_updated_only_after_that_read():
    run_on_ranks(2, _read_after_grad)


def _released_early() -> list[int]:
    """Program lines between each unit's release and the end of backward, for a GPT under dp."""
    model, data = _model_and_batches("gpt", 4)
    mesh = sf.Mesh("cpu", (2,), names=("dp",))
    pm = sf.compile(model, mesh, example_inputs=data[0], strategy="dp", optimizer=_opt)
    pm.bucket_bytes = 1  # one bucket per gradient: the finest release
    pm.step(*data[0])
    lines = next(iter(pm.programs.values())).source.splitlines()
    end = next(i for i, line in enumerate(lines) if "ready(None, None)" in line)
    return [end - i for i, line in enumerate(lines) if re.search(r"ready\(\d+,", line)]


def test_units_are_released_while_backward_still_runs():
    gaps = run_on_ranks(2, _released_early)[0]
    assert len(gaps) >= 10, gaps  # one unit per parameter of the 2-layer GPT
    # the first units (the last layers' parameters) leave many op lines of backward behind them
    assert max(gaps) > 50 and sorted(gaps, reverse=True)[len(gaps) // 2] > 10, gaps


def _traced(path: str) -> list[tuple[int, str, str]]:
    model, data = _model_and_batches("mlp", 8)
    mesh = sf.Mesh("cpu", (2,), names=("dp",))
    pm = sf.compile(model, mesh, example_inputs=data[0], strategy="dp", optimizer=_opt)
    pm.bucket_bytes = 64
    pm.step(*data[0], trace=path)
    return [(e.rank, e.track, e.name) for e in pm.events]


def test_traced_step_shows_compute_all_reduce_and_optimizer_per_rank(tmp_path):
    path = str(tmp_path / "step.json")
    events = run_on_ranks(2, _traced, path)[0]
    for rank in (0, 1):
        tracks = {t for r, t, _ in events if r == rank}
        assert {"compute", "all-reduce", "optimizer"} <= tracks, (rank, tracks)
        updates = [n for r, t, n in events if r == rank and t == "optimizer"]
        assert len(updates) >= 2, updates  # several units, each updated on its own
    doc = json.loads((tmp_path / "step.json").read_text())
    assert {e["args"]["name"] for e in doc["traceEvents"] if e.get("ph") == "M" and e["name"] == "thread_name"} >= {
        "compute",
        "all-reduce",
        "optimizer",
    }


class _Fails(torch.optim.SGD):
    def step(self, closure=None):  # type: ignore[no-untyped-def,override]
        raise RuntimeError("optimizer exploded")


def _failing_update(updates: str, failing: tuple[int, ...] = (0, 1)) -> str:
    """One dp step whose optimizer raises on the ranks ``failing``: the error text, or "no error"."""
    model, data = _model_and_batches("mlp", 8)
    mesh = sf.Mesh("cpu", (2,), names=("dp",))
    kind = _Fails if torch.distributed.get_rank() in failing else torch.optim.SGD
    pm = sf.compile(model, mesh, example_inputs=data[0], strategy="dp", optimizer=lambda ps: kind(ps, lr=0.1))
    pm.updates = updates
    try:
        pm.step(*data[0])
    except ActorError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("updates", ["loop", "actors"])
def test_an_update_that_raises_is_raised_naming_the_actor(updates):
    for message in run_on_ranks(2, _failing_update, updates):
        assert "'optimizer'" in message and "optimizer exploded" in message, message


@pytest.mark.parametrize("updates", ["loop", "inline"])
def test_an_update_failing_on_one_rank_does_not_leave_the_other_in_a_collective(updates):
    # the failing rank finishes its program (every collective matched) before raising, so its peer
    # completes the step instead of waiting in the loss's all-reduce until the collective timeout
    messages = run_on_ranks(2, _failing_update, updates, (1,), timeout=50)
    assert messages[0] == "no error", messages
    assert "'optimizer'" in messages[1] and "optimizer exploded" in messages[1], messages
