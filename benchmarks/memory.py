"""Memory benchmark: ``pm.memory()``'s predicted peak per rank against the peak measured by torch's profiler
(``shardflow.testing.memory.measure_step_peak``: allocation and free events of a real step on top of the
storages alive before it), and how long the verdict of ``memory_limit`` takes (lowering included).

Cases: the GPT and the MLP of benchmarks/train.py, on 2 ranks, as dp and tp, the GPT under dp with
every block recomputed in backward, and the BatchNorm CNN under dp. Each measurement is repeated ``--repeats`` times (median and range
reported). ZeRO against FSDP2: benchmarks/zero.py.

    .venv/bin/python benchmarks/memory.py [--repeats 3] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

import torch.multiprocessing as tmp

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks.common import (  # noqa: E402
    free_port,
    print_preamble,
    print_table,
    rank_session,
    run_world,
)

CASES = [
    ("mlp", "dp", False),
    ("mlp", "tp", False),
    ("gpt", "dp", False),
    ("gpt", "tp", False),
    ("gpt", "dp", True),
    ("cnn", "dp", False),
]
HEADER = [
    "case",
    "ranks",
    "predicted MiB",
    "measured MiB (median)",
    "measured range",
    "measured/predicted",
    "verdict s",
]


def _rank_main(rank: int, k: int, port: int, repeats: int, q: Any) -> None:
    def work() -> list[dict[str, Any]]:
        import shardflow as sf
        from shardflow.testing.memory import measure_step_peak, memory_case

        out = []
        for kind, strategy, recompute in CASES:
            model, data = memory_case(kind)
            started = time.perf_counter()
            pm = sf.compile(
                model,
                sf.Mesh("cpu", (k,), names=(strategy,)),
                data,
                strategy=strategy,
                memory_limit="64GiB",
                recompute=recompute,
            )
            verdict = time.perf_counter() - started  # capture, layouts, lowering, prediction, the check
            predicted = pm.memory().peak
            pm.step(*data)
            measured = [measure_step_peak(pm, *data)[0] for _ in range(repeats)]
            out.append(
                {
                    "case": f"{kind}-{strategy}{'-recompute' if recompute else ''}",
                    "k": k,
                    "predicted": predicted,
                    "measured": measured,
                    "verdict": verdict,
                }
            )
        return out

    rank_session(rank, k, port, timedelta(seconds=300), q, work)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    print_preamble()
    q = tmp.get_context("spawn").SimpleQueue()
    results = run_world(_rank_main, q, 2, (2, free_port(), args.repeats, q))
    rows = []
    for r in results:
        med = statistics.median(r["measured"])
        rows.append(
            [
                r["case"],
                str(r["k"]),
                f"{r['predicted'] / 2**20:.2f}",
                f"{med / 2**20:.2f}",
                f"{min(r['measured']) / 2**20:.2f}-{max(r['measured']) / 2**20:.2f}",
                f"{med / r['predicted']:.2f}",
                f"{r['verdict']:.2f}",
            ]
        )
    print_table(HEADER, rows, args.markdown)


if __name__ == "__main__":
    main()
