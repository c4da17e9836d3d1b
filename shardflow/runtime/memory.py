"""Predict each rank's peak memory from its static program, before any step runs.

What a rank holds is known once the program is lowered: its shards of parameters, buffers and inputs,
the optimizer's state (from the optimizer's kind and the shards it steps), and, line by line of the
generated program, every storage alive — activations kept for backward, boxed copies, gradients, bucket
buffers — with views and in-place results counted once (``ProgramMemory``, filled by graph/ir/liveness.py). The peak is
the larger of the program's peak and the optimizer step (gradients plus the update's temporaries), on
top of what persists. ``sf.compile(memory_limit=...)`` compares every rank's peak with the limit and
refuses a plan that cannot fit, naming what would (see graph/compile.py). Pipelines fill the same report
from their stages (runtime/pipeline.py). It sits in the runtime layer, below the compiler, so that both
kinds of plan report memory one way.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor

from shardflow.comm.collectives import all_gather_single


@dataclass(frozen=True)
class ProgramMemory:
    """What a program holds on this rank beyond its arguments (parameters, buffers, inputs)."""

    peak: int  # bytes alive at the worst line: activations, boxed copies, gradients, buckets
    at_peak: list[tuple[int, str]]  # (bytes, what) of everything alive there, largest first
    gradients: int  # bytes of the gradients it returns (alive until the optimizer step ends)
    peak_line: str  # the generated line where the peak occurs
    live: tuple[int, ...] = ()  # bytes alive after each line of the program, once what dies there is freed
    arena: int = 0  # bytes of the static placement's arena (graph/arena.py), in every figure above, held always


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied parameters and views count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        # meta and fake storages (a cost model's shards) have no address: told apart by their storage object
        seen[storage._cdata if t.is_meta or isinstance(t, FakeTensor) else storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def with_every_peak(report: MemoryReport) -> MemoryReport:
    """``report`` with every rank's peak (collective over the job; on a CUDA tensor under NCCL, which
    moves no host tensors)."""
    if not dist.is_initialized():
        return report
    mine = torch.tensor([report.peak], dtype=torch.int64, device=_collective_device())
    every = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=mine.device)
    all_gather_single(every, mine)
    return dataclasses.replace(report, peaks=tuple(int(v) for v in every.cpu()))


def _collective_device() -> str:
    """Where a small tensor for a job-wide collective lives: NCCL moves CUDA tensors only."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def device_limit(device_type: str) -> int | None:
    """The default ``memory_limit``: on a CUDA mesh, the bytes the device can still give (free, plus blocks
    torch's caching allocator holds unused), the least over the job's ranks so that every rank reaches the same
    verdict (collective); None elsewhere (no verdict unless asked for)."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    mine = free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    if dist.is_initialized() and dist.get_world_size() > 1:
        least = torch.tensor([mine], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        mine = int(least.item())
    return mine


def parse_bytes(limit: int | str) -> int:
    """``4096``, ``"512MiB"``, ``"4 GiB"``, ``"1.5GB"`` -> bytes."""
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return limit
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(limit))
    if isinstance(limit, str) and m and m.group(2).upper() in _UNITS and float(m.group(1)) > 0:
        return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    raise ValueError(f"memory_limit {limit!r} is not a positive size; give bytes or a string such as '4GiB'")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def optimizer_bytes(optimizer: torch.optim.Optimizer, every: bool = False) -> tuple[int, int, str]:
    """(state bytes, step temporaries, how they were estimated) for ``optimizer`` over its parameters that
    require gradients (``every``: all of them, for an optimizer stepping plain shards of parameters)."""
    total = temp = 0
    kinds = set()
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.requires_grad or every]
        nbytes = sum(p.numel() * p.element_size() for p in params)
        name = type(optimizer).__name__
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            per = 3 if group.get("amsgrad") else 2  # exp_avg, exp_avg_sq (+ max_exp_avg_sq)
            kinds.add(f"{name}: {per}x the parameters")
        elif isinstance(optimizer, torch.optim.SGD):
            per = 1 if group.get("momentum", 0) else 0
            kinds.add(f"{name}: {per}x the parameters")
        else:
            per = 2
            kinds.add(f"{name}: assumed 2x the parameters")
        total += per * nbytes
        temp = max(temp, update_temporaries(optimizer, params))
    return total, temp, "; ".join(sorted(kinds))


def update_temporaries(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Bytes an update of just ``params`` allocates for a moment: foreach updates make temporaries for every
    parameter at once, the loop one parameter at a time (Adam's denominator: a square root and its
    quotient, both alive for a moment)."""
    sizes = [p.numel() * p.element_size() for p in params]
    foreach = any(g.get("foreach") for g in optimizer.param_groups)
    return 2 * (sum(sizes) if foreach else max(sizes, default=0))


@dataclass(frozen=True)
class MemoryReport:
    """Predicted bytes on one rank: what persists, the program's peak, and every rank's total peak."""

    rank: int
    persistent: dict[str, int]  # parameters, buffers, optimizer state, inputs
    program: ProgramMemory
    optimizer_step: int  # gradients + the update's temporaries
    optimizer_note: str
    peaks: Sequence[int] = field(default_factory=tuple)  # every rank's predicted peak, by rank

    @property
    def peak(self) -> int:
        """This rank's predicted peak: what persists plus the larger of the program and the update."""
        return sum(self.persistent.values()) + max(self.program.peak, self.optimizer_step)

    @property
    def where(self) -> str:
        return (
            "during the forward/backward program"
            if self.program.peak >= self.optimizer_step
            else ("in the optimizer step")
        )

    def largest(self, n: int = 5) -> list[tuple[int, str]]:
        """The largest items at the peak: persistent ones and what the program holds there."""
        items = [(b, k) for k, b in self.persistent.items()]
        if self.program.peak >= self.optimizer_step:
            items += self.program.at_peak
        else:
            arena = self.program.arena
            if arena:
                items.append((arena, "arena of the program's temporaries (held between steps)"))
            items.append((self.optimizer_step - arena, "gradients + optimizer step temporaries"))
        return sorted(items, reverse=True)[:n]

    def __str__(self) -> str:
        lines = [f"predicted peak on rank {self.rank}: {fmt_bytes(self.peak)} ({self.where})"]
        if self.peaks:
            lines.append("every rank: " + ", ".join(f"{r}: {fmt_bytes(b)}" for r, b in enumerate(self.peaks)))
        lines.append("persistent: " + ", ".join(f"{k} {fmt_bytes(b)}" for k, b in self.persistent.items()))
        lines.append(f"optimizer state: {self.optimizer_note}")
        lines.append(
            f"program peak {fmt_bytes(self.program.peak)} at `{self.program.peak_line.strip()[:60]}`; "
            f"gradients {fmt_bytes(self.program.gradients)}"
        )
        lines.append("largest at the peak:")
        lines += [f"  {fmt_bytes(b):>12}  {what}" for b, what in self.largest(8)]
        return "\n".join(lines)
