"""Static placement (``sf.compile(..., arena=True)``): step time and predicted peak with a step's temporaries
in one arena at fixed offsets, against the same plan allocating them as it goes (the caching allocator).

The memory test's models (shardflow/testing/memory.py) on 2 ranks, each compiled twice; steps interleaved
A B A B, each timed call one step (max over ranks), medians of ``--repeats``. Both must give the same first
loss. The table also gives the arena's bytes against the sum of the blocks it holds (the reuse) and the
predicted peak with and without it (the arena is held for the whole step, temporaries in the caching
allocator only while they live).

    .venv/bin/python benchmarks/arena.py [--repeats 20] [--markdown]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import sys
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import free_port, print_preamble, print_table, rank_session, run_world, spread, timed_call

CASES = [("gpt", "dp"), ("gpt", "tp"), ("mlp", "dp"), ("cnn", "dp")]


def _work(repeats: int, warmup: int) -> dict[str, Any]:
    import shardflow as sf
    from shardflow.testing.memory import memory_case

    out: dict[str, Any] = {}
    for kind, strategy in CASES:
        model, data = memory_case(kind)
        mesh = sf.Mesh("cpu", (2,), names=(strategy,))
        pms = {a: sf.compile(model, mesh, example_inputs=data, strategy=strategy, arena=a) for a in (False, True)}
        first = {a: pm.step(*data) for a, pm in pms.items()}
        if abs(first[True] - first[False]) > 1e-5 * abs(first[False]):
            raise AssertionError(f"{kind}: first losses differ: {first}")
        for _ in range(warmup):
            for pm in pms.values():
                pm.step(*data)
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(repeats):
            for a in (False, True) if i % 2 == 0 else (True, False):
                times[a].append(timed_call(functools.partial(pms[a].step, *data)))
        arena = next(iter(pms[True].programs.values())).arena
        assert arena is not None
        placed = sum(v.nbytes for v in arena.views)
        peaks = {a: max(pm.memory().peaks) for a, pm in pms.items()}
        out[f"{kind} {strategy}"] = (times, arena.nbytes, placed, len(arena.views), peaks)
    return out


def _rank(rank: int, world: int, port: int, q: Any, repeats: int, warmup: int) -> None:
    rank_session(rank, world, port, datetime.timedelta(seconds=300), q, lambda: _work(repeats, warmup))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    print_preamble()
    q = mp.get_context("spawn").SimpleQueue()
    got = run_world(_rank, q, 2, (2, free_port(), q, args.repeats, args.warmup))
    rows = []
    for case, (times, nbytes, placed, blocks, peaks) in got.items():
        off, on = statistics.median(times[False]), statistics.median(times[True])
        rows.append(
            [
                case,
                f"{off * 1e3:.1f} (±{spread(times[False]):.0%})",
                f"{on * 1e3:.1f} (±{spread(times[True]):.0%})",
                f"{on / off:.2f}",
                f"{blocks} in {nbytes / 2**20:.2f} MiB (sum {placed / 2**20:.2f})",
                f"{peaks[False] / 2**20:.2f} -> {peaks[True] / 2**20:.2f}",
            ]
        )
    header = ["model, 2 ranks", "allocating ms", "arena ms", "arena / allocating", "arena blocks", "peak MiB"]
    print_table(header, rows, args.markdown)


if __name__ == "__main__":
    main()
