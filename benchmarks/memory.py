"""Memory benchmark: ``pm.memory()``'s predicted peak on every rank against the peak measured on that rank
during a real step (``shardflow.testing.memory``: the allocator's records of every thread, counted from
before the module is built, so nothing the planner says is trusted), and how long ``sf.compile``
takes with a ``memory_limit`` (capture, layouts, lowering, the prediction and the verdict).

Cases: ``shardflow.testing.memory_cases.CASES``, the same plans tests/graph/test_memory.py checks (every
strategy, ZeRO stage, recompute and both pipeline schedules, on 2 and 4 ranks). One row per rank; the rank
furthest from its prediction is marked ``<- worst``. Each case is compiled and measured ``--repeats`` times
(the median and range of the measured peak are reported).

    .venv/bin/python benchmarks/memory.py [--repeats 3] [--markdown] [--cases NAME,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import timedelta
from typing import Any

import torch.multiprocessing as tmp

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks.common import free_port, print_preamble, print_table, rank_session, run_world  # noqa: E402
from shardflow.testing.memory_cases import CASES, MemoryCase  # noqa: E402

HEADER = ["case", "rank", "predicted MiB", "measured MiB (median)", "measured range", "measured/predicted", "compile s"]


def _rank_main(rank: int, k: int, port: int, cases: list[MemoryCase], repeats: int, q: Any) -> None:
    def work() -> list[list[dict[str, Any]]]:
        import torch.distributed as dist

        from shardflow.testing.memory_cases import predict_and_measure

        out = []
        for case in cases:
            runs = [predict_and_measure(case, memory_limit="64GiB") for _ in range(repeats)]
            mine = {
                "case": case.name,
                "rank": rank,
                "predicted": runs[0].predicted,
                "measured": [r.measured for r in runs],
                "seconds": statistics.median(r.compile_seconds for r in runs),
            }
            every: list[Any] = [None] * k
            dist.all_gather_object(every, mine)  # every rank's figures, reported by rank 0
            out.append(every)
        return out

    rank_session(rank, k, port, timedelta(seconds=600), q, work)


def _rows(per_rank: list[dict[str, Any]]) -> list[list[str]]:
    def off(r: dict[str, Any]) -> float:
        return abs(statistics.median(r["measured"]) / r["predicted"] - 1)

    worst = max(range(len(per_rank)), key=lambda i: off(per_rank[i]))
    rows = []
    for i, r in enumerate(per_rank):
        med = statistics.median(r["measured"])
        rows.append(
            [
                r["case"],
                str(r["rank"]) + (" <- worst" if i == worst else ""),
                f"{r['predicted'] / 2**20:.2f}",
                f"{med / 2**20:.2f}",
                f"{min(r['measured']) / 2**20:.2f}-{max(r['measured']) / 2**20:.2f}",
                f"{med / r['predicted']:.3f}",
                f"{r['seconds']:.2f}",
            ]
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = p.parse_args()
    chosen = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    print_preamble()
    rows = []
    for k in sorted({c.world for c in chosen}):
        cases = [c for c in chosen if c.world == k]
        q = tmp.get_context("spawn").SimpleQueue()
        for per_rank in run_world(_rank_main, q, k, (k, free_port(), cases, args.repeats, q)):
            rows += _rows(per_rank)
    print_table(HEADER, rows, args.markdown)


if __name__ == "__main__":
    main()
