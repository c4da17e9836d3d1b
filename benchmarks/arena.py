"""Static placement (``sf.compile(..., arena=...)``): step time and predicted peak with a step's temporaries
in one arena at fixed offsets, against the same plan allocating them as it goes (the caching allocator).

The memory test's models (shardflow/testing/memory.py) on 2 ranks, each compiled three times: no arena,
``arena=True`` (placed where the predicted peak does not rise) and ``arena="all"`` (every placeable
temporary); steps interleaved in rotating order, each timed call one step (max over ranks), medians of
``--repeats``. All must give the same first loss. The table also gives each arena's bytes against the sum of
the blocks it holds (the reuse) and the predicted peaks (the arena is held for the whole step, temporaries
in the caching allocator only while they live).

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
MODES: list[Any] = [False, True, "all"]


def _work(repeats: int, warmup: int) -> dict[str, Any]:
    import shardflow as sf
    from shardflow.testing.memory import memory_case

    out: dict[str, Any] = {}
    for kind, strategy in CASES:
        model, data = memory_case(kind)
        mesh = sf.Mesh("cpu", (2,), names=(strategy,))
        pms = {a: sf.compile(model, mesh, example_inputs=data, strategy=strategy, arena=a) for a in MODES}
        first = {a: pm.step(*data) for a, pm in pms.items()}
        if any(abs(loss - first[False]) > 1e-5 * abs(first[False]) for loss in first.values()):
            raise AssertionError(f"{kind}: first losses differ: {first}")
        for _ in range(warmup):
            for pm in pms.values():
                pm.step(*data)
        times: dict[Any, list[float]] = {a: [] for a in MODES}
        for i in range(repeats):
            for a in MODES[i % 3 :] + MODES[: i % 3]:
                times[a].append(timed_call(functools.partial(pms[a].step, *data)))
        arenas = {a: next(iter(pms[a].programs.values())).arena for a in MODES[1:]}
        blocks = {
            a: (len(x.views), x.nbytes, sum(v.nbytes for v in x.views)) if x else (0, 0, 0) for a, x in arenas.items()
        }
        peaks = {a: max(pm.memory().peaks) for a, pm in pms.items()}
        out[f"{kind} {strategy}"] = (times, blocks, peaks)
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
    for case, (times, blocks, peaks) in got.items():
        off = statistics.median(times[False])
        for a in MODES:
            ms = statistics.median(times[a])
            n, nbytes, placed = blocks.get(a, (0, 0, 0))
            rows.append(
                [
                    case,
                    {False: "allocator", True: "arena=True", "all": "arena='all'"}[a],
                    f"{ms * 1e3:.1f} (±{spread(times[a]):.0%})",
                    f"{ms / off:.2f}",
                    f"{n} in {nbytes / 2**20:.2f} (sum {placed / 2**20:.2f})" if n else "",
                    f"{peaks[a] / 2**20:.2f}",
                    f"{peaks[a] / peaks[False]:.2f}",
                ]
            )
    header = [
        "model, 2 ranks",
        "temporaries",
        "step ms",
        "/ allocator",
        "arena blocks in MiB",
        "peak MiB",
        "/ allocator",
    ]
    print_table(header, rows, args.markdown)


if __name__ == "__main__":
    main()
