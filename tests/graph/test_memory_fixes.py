"""``sf.MemoryPlanError`` prices changes and says which fit; these tests take two of them at their word.

For "a batch of N per step instead of B" (compiled steps) and "micro_batches=M (micro-batches half as
large)" (pipelines): the limit is three quarters of the peak measured for the plan as given
(shardflow/testing/memory.py, which does not ask the planner), the plan as given must be refused, the message must say the change fits, and the change parsed from the message is then
compiled under the same limit, stepped, and measured: its real peak is under the limit, and its loss is plain
PyTorch's."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import shardflow as sf
from shardflow.models import GPT, MLP, GPTConfig, MLPConfig
from shardflow.testing import run_on_ranks
from shardflow.testing.memory import measure_built
from tests.graph.test_compile import reference_step

# The limit: this share of the plan's own measured peak, below what the plan as given needs and above what
# the changes tested here need (about half of it, for the MLP and the GPT pipeline below).
_SHARE = 0.75


def _adamw(ps):  # type: ignore[no-untyped-def]
    return torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, foreach=False)


def _largest(nbytes: int) -> int:
    """The largest of every rank's ``nbytes`` (the refusal compares the largest rank with the limit)."""
    t = torch.tensor([nbytes], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def measured_largest(build: Callable[[], Any], x: torch.Tensor, y: torch.Tensor) -> tuple[int, float, int]:
    """(the largest rank's measured peak of the second step of ``build()``'s module, its loss, steps run)."""
    pm, measured = measure_built(build, x, y)
    return _largest(measured.peak), float(measured.loss), pm.steps


def refused_under_its_measured_peak(
    build: Callable[..., Callable[[], Any]], given: Any, x: Any, y: Any
) -> tuple[int, str]:
    """(limit, the refusal's message): the limit is ``_SHARE`` of the plan's own measured peak (largest rank),
    no prediction involved, and the plan ``build(given)`` must be refused under it."""
    limit = int(_SHARE * measured_largest(build(given), x, y)[0])
    try:
        build(given, memory_limit=limit)()
    except sf.MemoryPlanError as e:
        return limit, str(e)
    raise AssertionError(f"a plan measured over {limit} B was accepted under it")


def _plain_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Plain PyTorch's loss at the last of ``steps`` steps on one batch, from a copy of ``model``."""
    ref = copy.deepcopy(model)
    opt = _adamw(ref.parameters())
    return [reference_step(ref, opt, x, y) for _ in range(steps)][-1]


def _offered(message: str, pattern: str) -> re.Match[str]:
    """The line of the refusal's "Changes" list that matches ``pattern``, which must say it fits."""
    changes = message.split("Changes and their predicted peaks")[1]
    found = re.search(pattern + r": [0-9.]+ [KMG]?i?B \((fits|does not fit)\)", changes)
    assert found is not None, message
    assert found.group(found.re.groups) == "fits", message
    return found


def _half_batch() -> tuple[int, int, int, str]:
    # activations dominate (1024 rows through 128-wide layers, 0.1 MB of weights): the batch sets the peak
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=64, hidden_sizes=(128, 128, 128), num_classes=16))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(1024, 64, generator=gen), torch.randint(0, 16, (1024,), generator=gen)
    mesh = sf.Mesh("cpu", (2,), names=("dp",))

    def build(rows: int, **limit: Any) -> Callable[[], Any]:
        batch = (x[:rows], y[:rows])
        return lambda: sf.compile(copy.deepcopy(model), mesh, batch, optimizer=_adamw, max_grad_norm=0.5, **limit)

    limit, message = refused_under_its_measured_peak(build, 1024, x, y)
    rows = int(_offered(message, r"a batch of (\d+) per step instead of 1024").group(1))
    peak, loss, steps = measured_largest(build(rows, memory_limit=limit), x[:rows], y[:rows])  # accepted, then run
    want = _plain_loss(model, x[:rows], y[:rows], steps)
    assert abs(loss - want) <= 1e-5 + 1e-4 * abs(want), (loss, want)
    return peak, limit, rows, message


def test_half_the_batch_that_the_refusal_prices_fits_when_run():
    for peak, limit, rows, message in run_on_ranks(2, _half_batch, timeout=300):
        assert rows == 512, message
        assert peak <= limit, (peak, limit, message)


def _more_micro_batches() -> tuple[int, int, str]:
    # 1F1B keeps at most p - s micro-batches in flight: micro-batches half as large hold half the activations
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=4, n_head=2, n_embd=32))
    x = torch.randint(0, 64, (16, 64), generator=torch.Generator().manual_seed(1))
    y, mesh = torch.roll(x, -1, 1), sf.Mesh("cpu", (2,), names=("pp",))
    given = sf.Pipeline(micro_batches=2, schedule="1f1b", split_points=["transformer.h.2"])

    def build(pipeline: sf.Pipeline, **limit: Any) -> Callable[[], Any]:
        return lambda: sf.compile(
            copy.deepcopy(model), mesh, (x, y), pipeline=pipeline, optimizer=_adamw, max_grad_norm=0.5, **limit
        )

    limit, message = refused_under_its_measured_peak(build, given, x, y)
    m = int(_offered(message, r"micro_batches=(\d+) \(micro-batches half as large\)").group(1))
    peak, loss, steps = measured_largest(build(dataclasses.replace(given, micro_batches=m), memory_limit=limit), x, y)
    want = _plain_loss(model, x, y, steps)
    assert abs(loss - want) <= 1e-5 + 1e-4 * abs(want), (loss, want)
    return peak, limit, message


def test_more_micro_batches_that_the_refusal_prices_fit_when_run():
    for peak, limit, message in run_on_ranks(2, _more_micro_batches, timeout=300):
        assert "micro_batches=4 (micro-batches half as large)" in message, message
        assert peak <= limit, (peak, limit, message)
