"""Measure what a process really holds, trusting nothing of the planner: the independent side of every
memory prediction test and of the memory benchmark.

Decision: on CPU, memray records every call into the C allocator made by any thread of the process (gloo's
and the actors' threads included), in one global order. torch's CPU allocator takes each tensor storage
with ``posix_memalign``, so the live ``posix_memalign`` blocks are the tensor bytes the process holds (plus
any other library's ``posix_memalign`` blocks, e.g. a kernel's scratch space, which count too): the CPU
counterpart of ``torch.cuda.memory_allocated``. Storages from elsewhere (shared memory, pinned memory,
numpy arrays, memory-mapped files) are not counted; none of shardflow's steps on CPU makes them.
Tracking starts before the module is built, so everything shardflow keeps (parameters, optimizer state,
caches, staging and bucket buffers) is in the count, and the measured step is the ``pm.step`` users call. On GPU the caching allocator's own counters are
read instead (``torch.cuda.memory_allocated`` / ``max_memory_allocated``).

    with track_allocations():
        pm = sf.compile(model, mesh, batch)
        pm.step(*batch)  # the optimizer's state exists from here on, as the prediction assumes
        peak, loss, held = measure_step_peak(pm, *batch)

or ``pm, measured = measure_built(lambda: sf.compile(model, mesh, batch), *batch)``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch

_MARK = 777_781  # bytes: an odd size no tensor of this project's cases has; marks are _MARK + 2 * i


def memory_case(kind: str) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
    """(model, batch) of the memory tests and benchmark: ``"gpt"`` (2 layers, 128 wide, 8 x 64 tokens),
    ``"cnn"`` (BatchNorm CNN, 32 x 3 x 32 x 32 images) or ``"mlp"`` (256 -> 1024 -> 1024 -> 16, batch 64), the
    same weights every call."""
    from shardflow.models import GPT, MLP, CNNConfig, GPTConfig, MLPConfig, SmallCNN

    torch.manual_seed(0)
    if kind == "gpt":
        x = torch.randint(0, 256, (8, 64))
        return GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=128)), (x, x)
    if kind == "cnn":
        cnn = SmallCNN(CNNConfig(in_channels=3, image_size=32, channels=(16, 32), num_classes=10))
        return cnn, (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    model = MLP(MLPConfig(in_features=256, hidden_sizes=(1024, 1024), num_classes=16))
    return model, (torch.randn(64, 256), torch.randint(0, 16, (64,)))


class MeasuredStep(NamedTuple):
    """One measured training step on this rank."""

    peak: int  # most tensor bytes alive at once during the step, counted from before the module was built
    loss: Any  # what ``pm.step`` returned
    held: int  # tensor bytes alive when the step began


class Window(NamedTuple):
    """Tensor bytes between two marks of a trace."""

    held: int  # alive at the first mark
    peak: int  # most alive at once between the marks (at least ``held``)


class Record(NamedTuple):
    """One allocator call: ``size > 0`` a tensor storage allocated at ``address``, ``size == 0`` a free."""

    address: int
    size: int


class AllocationTrace:
    """The tensor allocations of one tracked stretch of this process; ``mark()`` names moments in it, and
    ``window(i, i + 1)`` reads the stretch between two marks once tracking has stopped."""

    def __init__(self, device_type: str, path: str) -> None:
        self.device_type = device_type
        self._path = path
        self._marks = 0
        self._windows: dict[tuple[int, int], Window] | None = None
        self._tracker: Any = None
        self._cuda_held: list[int] = []
        self._cuda_peaks: list[int] = []
        self._cuda_base = 0

    def start(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize()
            self._cuda_base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        import memray

        # native stacks are not needed and cost most of memray's time
        self._tracker = memray.Tracker(self._path, native_traces=False, trace_python_allocators=False)
        self._tracker.__enter__()

    def mark(self) -> int:
        """Mark this moment (the calling thread's next allocation); returns the mark's index."""
        if self._windows is not None:
            raise RuntimeError("this allocation trace has stopped: marks go inside track_allocations()")
        index = self._marks
        self._marks += 1
        if self.device_type == "cuda":
            torch.cuda.synchronize()
            self._cuda_peaks.append(torch.cuda.max_memory_allocated() - self._cuda_base)
            self._cuda_held.append(torch.cuda.memory_allocated() - self._cuda_base)
            torch.cuda.reset_peak_memory_stats()
        else:
            block = torch.empty(_MARK + 2 * index, dtype=torch.uint8)
            del block
        return index

    def stop(self) -> None:
        """Stop tracking and read the windows between marks (idempotent)."""
        if self._windows is not None:
            return
        if self.device_type == "cuda":
            held, peaks = self._cuda_held, self._cuda_peaks  # the peak before mark i + 1 is read at it
            self._windows = {(i, i + 1): Window(held[i], max(held[i], peaks[i + 1])) for i in range(len(held) - 1)}
            return
        self._tracker.__exit__(None, None, None)
        self._windows = windows(_records(self._path), self._marks)

    def window(self, start: int, end: int) -> Window:
        """Tensor bytes held at mark ``start`` and the most alive at once until mark ``start + 1``."""
        if self._windows is None or (start, end) not in self._windows:
            raise ValueError(f"no window ({start}, {end}): read consecutive marks' windows after tracking stops")
        return self._windows[(start, end)]


_ACTIVE: list[AllocationTrace] = []


@contextlib.contextmanager
def track_allocations(device_type: str = "cpu") -> Iterator[AllocationTrace]:
    """Count the tensor allocations of every thread from now until the block ends (or until
    ``measure_step_peak`` stops it): the baseline, zero, is now, so build the module inside the block."""
    if _ACTIVE:
        raise RuntimeError("track_allocations() is already active in this process: tracking does not nest")
    with tempfile.TemporaryDirectory(prefix="sf-alloc-") as tmp:
        trace = AllocationTrace(device_type, os.path.join(tmp, "allocations.bin"))
        trace.start()
        _ACTIVE.append(trace)
        try:
            yield trace
        finally:
            _ACTIVE.clear()
            trace.stop()


def _records(path: str) -> Iterator[Record]:
    from memray import AllocatorType, FileReader

    for rec in FileReader(path).get_allocation_records():
        if rec.allocator == AllocatorType.POSIX_MEMALIGN:
            yield Record(rec.address, rec.size)
        elif rec.allocator == AllocatorType.FREE:
            yield Record(rec.address, 0)


def windows(records: Iterable[Record], marks: int) -> dict[tuple[int, int], Window]:
    """Bytes held at each mark and the peak until the next, from allocator records in their global order.
    A free of an address not allocated since tracking began is another block's (older) and not counted."""
    mark_sizes = {_MARK + 2 * i for i in range(marks)}
    live: dict[int, int] = {}
    held: list[int] = []
    out: dict[tuple[int, int], Window] = {}
    running = peak = 0
    for rec in records:
        if rec.size in mark_sizes:
            if held:
                out[(len(held) - 1, len(held))] = Window(held[-1], peak)
            held.append(running)
            peak = running
            continue  # the mark's own free matches nothing live
        if rec.size > 0:
            running += rec.size - live.pop(rec.address, 0)  # an address handed out again was freed by then
            live[rec.address] = rec.size
            peak = max(peak, running)
        elif rec.address in live:
            running -= live.pop(rec.address)
    return out


def measure_step_peak(pm: Any, *inputs: Any) -> MeasuredStep:
    """Run ``pm.step(*inputs)`` (any module kind) and measure it: its peak, and what was held when it began,
    counted from the start of the active ``track_allocations()`` block, which must have begun before the
    module was built. Stops the tracking (its records are read then)."""
    if not _ACTIVE:
        raise RuntimeError(
            "measure_step_peak needs an active track_allocations() block begun before the module was built: "
            "build the module and run its first step inside `with track_allocations():`"
        )
    trace = _ACTIVE[0]
    start = trace.mark()
    loss = pm.step(*inputs)
    trace.mark()
    trace.stop()
    window = trace.window(start, start + 1)
    return MeasuredStep(peak=window.peak, loss=loss, held=window.held)


def measure_built(build: Callable[[], Any], *inputs: Any) -> tuple[Any, MeasuredStep]:
    """``build()`` a module inside a fresh ``track_allocations()`` block, run its first step on ``inputs`` (the
    optimizer's state exists from then on, as predictions assume) and measure the second: (module, figures)."""
    with track_allocations():
        pm = build()
        pm.step(*inputs)
        return pm, measure_step_peak(pm, *inputs)


def peak_of(step: Callable[[], Any], device_type: str = "cpu") -> int:
    """Tensor bytes above those alive before ``step()`` at its worst moment (any thread): measures a peer
    (FSDP2, DDP) the same way as shardflow."""
    with track_allocations(device_type) as trace:
        trace.mark()
        step()
        trace.mark()
    window = trace.window(0, 1)
    return window.peak - window.held
