"""Data-pipeline benchmark: a training loop fed by ``sf.Loader`` (reader and collator actors, two
registers) against the same loop fed by ``torch.utils.data.DataLoader`` (one worker process,
``prefetch_factor=2``), with a reader slow enough to matter: every sample is its own ``.npy`` file on disk,
and the files of each batch are evicted from the page cache (``posix_fadvise(DONTNEED)``) before the epoch,
so each read goes to the device. The consumer is a plain PyTorch MLP step (forward, backward, AdamW).

Reported per batch, medians over ``--repeats`` epochs run ABAB: reading alone (the loader without a
consumer), the step alone (on batches already in memory), each loop's time, and the loop over the slowest
part (1.0: reading and compute fully overlap; 2.0: they alternate). The issue's target is <= 1.1.

    .venv/bin/python benchmarks/loader.py [--repeats 7] [--batches 24] [--markdown]
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

HEADER = ["case", "read ms/batch", "step ms/batch", "loop ms/batch", "loop / slowest part", "peer loop / sf loop"]


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


def _epoch(batches: Any, step: Any) -> float:
    """Seconds per batch of one pass over ``batches``, running ``step`` on each."""
    start = time.perf_counter()
    n = 0
    for x, y in batches:
        step(x, y)
        n += 1
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> None:
    import shardflow as sf

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--features", type=int, default=16384, help="float32 values per sample file (64 KiB)")
    p.add_argument("--width", type=int, default=128, help="hidden width: 128 makes the step about as long as a read")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one core computes, the other reads (both sides alike)
    print_preamble()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(args.features, args.width), nn.ReLU(), nn.Linear(args.width, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    with tempfile.TemporaryDirectory(dir=os.environ.get("SF_BENCH_DIR", "/var/tmp")) as root:
        data = NpyFiles(root, args.batches * args.batch_size, args.features)
        peer = torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=1, prefetch_factor=2)
        ours = sf.Loader(data, batch_size=args.batch_size)
        in_memory = list(sf.Loader(data, batch_size=args.batch_size))
        _epoch(in_memory, step)  # warm-up
        read, alone, loop_sf, loop_peer = [], [], [], []
        for i in range(args.repeats):
            data.evict()
            read.append(_epoch(ours, lambda x, y: None))
            alone.append(_epoch(in_memory, step))
            sides = [(loop_sf, ours), (loop_peer, peer)]
            for times, loader in sides if i % 2 == 0 else sides[::-1]:
                data.evict()
                times.append(_epoch(loader, step))
    r, s, sf_ms, peer_ms = (statistics.median(v) * 1e3 for v in (read, alone, loop_sf, loop_peer))
    rows = [
        [
            "sf.Loader (2 registers)",
            f"{r:.1f}",
            f"{s:.1f}",
            f"{sf_ms:.1f}",
            f"{sf_ms / max(r, s):.2f}",
            f"{peer_ms / sf_ms:.2f}",
        ],
        ["DataLoader (1 worker)", f"{r:.1f}", f"{s:.1f}", f"{peer_ms:.1f}", f"{peer_ms / max(r, s):.2f}", "1.00"],
    ]
    print_table(HEADER, rows, args.markdown)


if __name__ == "__main__":
    main()
