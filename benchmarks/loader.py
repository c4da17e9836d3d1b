"""Data-pipeline benchmark: a training loop fed by ``sf.Loader`` (reader and collator actors, two registers, the
reader on ``k`` threads) against the same loop fed by ``torch.utils.data.DataLoader`` (``k`` worker processes,
``persistent_workers=True`` as torch recommends for more than one epoch, ``prefetch_factor=2``, its default;
``pin_memory`` stays off: the step runs on the CPU, so there is no copy to a device to speed up, and
``sf.Loader``'s device-copy actor does not run either), with a reader slow enough to matter: every sample is
its own ``.npy`` file on disk,
and the files of each batch are evicted from the page cache (``posix_fadvise(DONTNEED)``) before the epoch, so
each read goes to the device. The consumer is a plain PyTorch MLP step (forward, backward, AdamW).

Reported per batch, medians over ``--repeats`` epochs run ABAB: reading alone (each loader without a
consumer), the step alone (on batches already in memory), each loop's time, and the loop over the slowest
part (1.0: reading and compute fully overlap; 2.0: they alternate). The target is <= 1.1. "filled"
is the loop from the first batch's arrival on: the first read of an epoch has nothing to hide under, with
either loader (1/``--batches`` of a read per batch). With ``--device-ms T`` the step is a stand-in for an
accelerator's (``benchmarks/device_time.py``: T ms during which the host thread waits and its core is free),
so the loop measures the overlap itself, without the step and the reads taking each other's CPU.

Every loader makes one untimed pass first (persistent workers start there). The headline ratio, "loop / sf.Loader
loop", compares with the persistent ``DataLoader``; a third row per ``k``, "started each pass", is
``DataLoader``'s default (``persistent_workers=False``): its workers start again at every pass, and that start-up
is inside its loop time.

    .venv/bin/python benchmarks/loader.py [--repeats 7] [--batches 24] [--readers 1,4] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks.common import print_preamble, print_table  # noqa: E402
from benchmarks.device_time import device_time  # noqa: E402

HEADER = [
    "case",
    "read ms/batch",
    "step ms/batch",
    "loop ms/batch",
    "loop / slowest part",
    "filled loop ms/batch",
    "filled / slowest part",
    "loop / sf.Loader loop (>1: sf faster)",
]


class NpyFiles(torch.utils.data.Dataset):
    """One file per sample: ``features`` float32 values and a label."""

    def __init__(self, root: str, n: int, features: int) -> None:
        self.root, self.n = root, n
        rng = np.random.default_rng(0)
        for i in range(n):
            np.save(os.path.join(root, f"{i}.npy"), rng.standard_normal(features).astype(np.float32))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.load(os.path.join(self.root, f"{i}.npy"))), i % 10

    def evict(self) -> None:
        """Drop the files from the page cache so the next read goes to the device."""
        for i in range(self.n):
            fd = os.open(os.path.join(self.root, f"{i}.npy"), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _epoch(batches: Any, step: Any, steady: list[float] | None = None) -> float:
    """Seconds per batch of one pass over ``batches``, running ``step`` on each; with ``steady``, also
    appends the seconds per batch after the first batch arrived (the pipeline filled)."""
    start = time.perf_counter()
    first = start
    n = 0
    for x, y in batches:
        if n == 0:
            first = time.perf_counter()
        step(x, y)
        n += 1
    end = time.perf_counter()
    if steady is not None:
        steady.append((end - first) / n)
    return (end - start) / n


def _data_loader(data: Any, batch_size: int, workers: int, persistent: bool) -> Any:
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, num_workers=workers, prefetch_factor=2, persistent_workers=persistent
    )


def main(argv: list[str] | None = None) -> None:
    import shardflow as sf

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--features", type=int, default=16384, help="float32 values per sample file (64 KiB)")
    p.add_argument("--width", type=int, default=128, help="hidden width: 128 makes the step about as long as a read")
    p.add_argument("--readers", default="1,4", help="reader threads (DataLoader workers), comma-separated")
    p.add_argument(
        "--device-ms",
        type=float,
        default=0.0,
        help="replace the MLP step by a stand-in accelerator step of this many ms that leaves the CPU free",
    )
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one core computes, the other reads (both sides alike)
    print_preamble()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(args.features, args.width), nn.ReLU(), nn.Linear(args.width, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if args.device_ms > 0:  # the host launches the step and waits for the device, its core free meanwhile
            device_time(x[:1], args.device_ms)
            return
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    counts = sorted({int(k) for k in args.readers.split(",")})
    if any(k < 1 for k in counts):
        p.error(f"--readers {args.readers}: each count must be >= 1")
    with tempfile.TemporaryDirectory(dir=os.environ.get("SF_BENCH_DIR", "/var/tmp")) as root:
        data = NpyFiles(root, args.batches * args.batch_size, args.features)
        # per count k: shardflow's reader on k threads against DataLoader with k worker processes, persistent
        # (the headline) and started at every pass (DataLoader's default)
        cases: list[tuple[str, Any]] = []
        for k in counts:
            workers = f"{k} worker{'s' if k > 1 else ''}"
            cases.append(
                (f"sf.Loader (readers={k}, 2 registers)", sf.Loader(data, batch_size=args.batch_size, readers=k))
            )
            cases.append((f"DataLoader ({workers}, persistent)", _data_loader(data, args.batch_size, k, True)))
            cases.append((f"DataLoader ({workers}, started each pass)", _data_loader(data, args.batch_size, k, False)))
        in_memory = list(sf.Loader(data, batch_size=args.batch_size))
        _epoch(in_memory, step)  # warm-up
        for _, loader in cases:  # an untimed pass each: persistent workers start here
            _epoch(loader, lambda x, y: None)
        alone: list[float] = []
        read: dict[str, list[float]] = {name: [] for name, _ in cases}
        loop: dict[str, list[float]] = {name: [] for name, _ in cases}
        filled: dict[str, list[float]] = {name: [] for name, _ in cases}
        for i in range(args.repeats):
            alone.append(_epoch(in_memory, step))
            for name, loader in cases if i % 2 == 0 else cases[::-1]:  # ABAB: every side early and late
                data.evict()
                read[name].append(_epoch(loader, lambda x, y: None))
                data.evict()
                loop[name].append(_epoch(loader, step, filled[name]))
    s = statistics.median(alone) * 1e3
    med = {name: [statistics.median(v[name]) * 1e3 for v in (read, loop, filled)] for name, _ in cases}
    rows = []
    for j, (name, _) in enumerate(cases):
        r, ms, st = med[name]
        slowest = max(r, s)
        sf_loop = med[cases[j - j % 3][0]][1]  # the sf.Loader row of the same k
        rows.append(
            [name, f"{r:.1f}", f"{s:.1f}", f"{ms:.1f}", f"{ms / slowest:.2f}", f"{st:.1f}", f"{st / slowest:.2f}"]
            + [f"{ms / sf_loop:.2f}"]
        )
    print_table(HEADER, rows, args.markdown)


if __name__ == "__main__":
    main()
