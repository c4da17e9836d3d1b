"""The plans whose predicted memory is checked against a measurement, shared by the memory test and the
memory benchmark so that both report the same cases: every strategy, ZeRO stage, recompute and both
pipeline schedules, on 2 and on 4 ranks. Each rank answers for itself: the checks read every rank."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from shardflow.testing.memory import measure_step_peak, memory_case, track_allocations


@dataclass(frozen=True)
class MemoryCase:
    """One plan of a ``memory_case`` model: the keywords of ``sf.compile`` that matter for memory."""

    kind: str  # "gpt", "mlp" or "cnn" (shardflow.testing.memory.memory_case)
    shape: tuple[int, ...]
    names: tuple[str, ...]
    strategy: str = "dp"
    zero: int = 0
    recompute: bool = False
    schedule: str | None = None  # a pipeline over the "pp" axis, cut in two stages
    micro_batches: int = 4
    arena: bool | str = False
    max_grad_norm: float | None = None  # clipping: the updates wait for the global norm

    @property
    def world(self) -> int:
        return math.prod(self.shape)

    @property
    def name(self) -> str:
        axes = "x".join(f"{n}{s}" for n, s in zip(self.names, self.shape, strict=True))
        parts = [self.kind, axes, self.strategy]
        if self.schedule:
            parts.append(f"{self.schedule}-m{self.micro_batches}")
        if self.zero:
            parts.append(f"zero{self.zero}")
        if self.recompute:
            parts.append("recompute")
        if self.arena:
            parts.append(f"arena-{self.arena}")
        if self.max_grad_norm is not None:
            parts.append("clip")
        return "-".join(parts)


class RankMemory(NamedTuple):
    """One rank's figures for a case."""

    rank: int
    predicted: int  # pm.memory().peak on this rank, before any step
    measured: int  # the most tensor bytes alive at once during the second step, counted from before compile
    held: int  # tensor bytes alive when that step began
    report: str  # str(pm.memory()), to read when a check fails
    compile_seconds: float  # sf.compile: capture, layouts, lowering, the prediction and any limit's verdict
    estimated: int = 0  # pm.plan.estimate's peak for this rank (fake tensors, no process group)


def predict_and_measure(case: MemoryCase, **compile_options: Any) -> RankMemory:
    """Compile ``case`` (on every rank of the job), predict, and measure its second step on this rank."""
    import torch.distributed as dist

    import shardflow as sf

    model, data = memory_case(case.kind)
    options: dict[str, Any] = {"strategy": case.strategy, "zero": case.zero, "recompute": case.recompute}
    if case.arena:
        options["arena"] = case.arena
    if case.max_grad_norm is not None:
        options["max_grad_norm"] = case.max_grad_norm
    if case.schedule:
        options["pipeline"] = sf.Pipeline(axis="pp", micro_batches=case.micro_batches, schedule=case.schedule)
    with track_allocations():
        started = time.perf_counter()
        pm = sf.compile(model, sf.Mesh("cpu", case.shape, names=case.names), data, **options, **compile_options)
        seconds = time.perf_counter() - started
        report = pm.memory()
        pm.step(*data)  # the optimizer's state exists from here on, as the prediction assumes
        measured = measure_step_peak(pm, *data)
    rank = dist.get_rank()
    from shardflow.graph.estimate import Estimator

    # priced as a plan, apart from the module: a virtual mesh, fake tensors, no process group
    estimated = Estimator(model, data).peak_bytes(pm.plan)[pm.mesh.ranks.index(rank)]
    return RankMemory(rank, report.peak, measured.peak, measured.held, str(report), seconds, estimated)


CASES = [
    MemoryCase("mlp", (2,), ("dp",)),
    MemoryCase("mlp", (2,), ("tp",), "tp"),
    MemoryCase("gpt", (2,), ("dp",)),
    MemoryCase("gpt", (2,), ("tp",), "tp"),
    MemoryCase("cnn", (2,), ("dp",)),
    MemoryCase("gpt", (2,), ("dp",), recompute=True),
    MemoryCase("mlp", (2,), ("dp",), zero=1),
    MemoryCase("mlp", (2,), ("dp",), zero=2),
    MemoryCase("mlp", (2,), ("dp",), zero=3),
    MemoryCase("gpt", (2,), ("dp",), zero=3),
    MemoryCase("gpt", (2,), ("pp",), schedule="gpipe"),
    MemoryCase("gpt", (2,), ("pp",), schedule="1f1b"),
    MemoryCase("mlp", (2,), ("dp",), max_grad_norm=1.0),
    MemoryCase("gpt", (2,), ("pp",), schedule="1f1b", max_grad_norm=1.0),
    MemoryCase("mlp", (4,), ("dp",)),
    MemoryCase("gpt", (4,), ("tp",), "tp"),
    MemoryCase("mlp", (2, 2), ("dp", "tp"), "hybrid"),
    MemoryCase("gpt", (2, 2), ("dp", "tp"), "hybrid"),
    MemoryCase("gpt", (4,), ("dp",), recompute=True),
    MemoryCase("gpt", (4,), ("dp",), zero=1),
    MemoryCase("gpt", (4,), ("dp",), zero=2),
    MemoryCase("gpt", (2, 2), ("dp", "tp"), "hybrid", zero=3),
    MemoryCase("gpt", (2, 2), ("pp", "dp"), schedule="gpipe"),
    MemoryCase("gpt", (2, 2), ("pp", "dp"), schedule="1f1b"),
    MemoryCase("gpt", (2, 2), ("pp", "tp"), "tp", schedule="1f1b"),
    MemoryCase("gpt", (2, 2), ("pp", "tp"), "tp", schedule="1f1b", arena="all"),
]
