"""Memory benchmark: ``pm.memory()``'s predicted peak per rank against the peak measured by torch's profiler
(``shardflow.testing.memory.measure_step_peak``: allocation and free events of a real step on top of the
storages alive before it), and how long the verdict of ``memory_limit`` takes (lowering included).

Cases (``CASES``): the GPT and the MLP of benchmarks/train.py on 2 ranks as dp and tp, the GPT under dp
with every block recomputed, the BatchNorm CNN under dp, ZeRO stages 1-3, the GPT as two pipeline stages
(GPipe and 1F1B, 4 micro-batches), both on a 2 x 2 dp x tp mesh (4 ranks), and the GPT as two
tensor-parallel stages (a 2 x 2 pp x tp mesh, 1F1B). Rank 0's figures; each
measurement is repeated ``--repeats`` times (median and range reported). ZeRO against FSDP2:
benchmarks/zero.py.

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

# (kind, mesh shape, axis names, strategy, zero, recompute, pipeline schedule or None)
CASES = [
    ("mlp", (2,), ("dp",), "dp", 0, False, None),
    ("mlp", (2,), ("tp",), "tp", 0, False, None),
    ("gpt", (2,), ("dp",), "dp", 0, False, None),
    ("gpt", (2,), ("tp",), "tp", 0, False, None),
    ("gpt", (2,), ("dp",), "dp", 0, True, None),
    ("cnn", (2,), ("dp",), "dp", 0, False, None),
    ("mlp", (2,), ("dp",), "dp", 1, False, None),
    ("mlp", (2,), ("dp",), "dp", 2, False, None),
    ("mlp", (2,), ("dp",), "dp", 3, False, None),
    ("gpt", (2,), ("dp",), "dp", 3, False, None),
    ("gpt", (2,), ("pp",), "dp", 0, False, "gpipe"),
    ("gpt", (2,), ("pp",), "dp", 0, False, "1f1b"),
    ("mlp", (2, 2), ("dp", "tp"), "hybrid", 0, False, None),
    ("gpt", (2, 2), ("dp", "tp"), "hybrid", 0, False, None),
    ("gpt", (2, 2), ("pp", "tp"), "tp", 0, False, "1f1b"),  # tensor-parallel stages (lowered programs)
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


def _name(kind: str, shape: tuple[int, ...], strategy: str, zero: int, recompute: bool, schedule: str | None) -> str:
    name = f"{kind}-{schedule}-m4" + ("" if strategy == "dp" else f"-{strategy}") if schedule else f"{kind}-{strategy}"
    return name + (f"-zero{zero}" if zero else "") + ("-recompute" if recompute else "")


def _rank_main(rank: int, k: int, port: int, repeats: int, q: Any) -> None:
    def work() -> list[dict[str, Any]]:
        import shardflow as sf
        from shardflow.testing.memory import measure_pipeline_peak, measure_step_peak, memory_case

        out = []
        for kind, shape, names, strategy, zero, recompute, schedule in CASES:
            if len(shape) != 1 and k != 4 or len(shape) == 1 and k != 2:
                continue
            model, data = memory_case(kind)
            started = time.perf_counter()
            pipeline = sf.Pipeline(axis="pp", micro_batches=4, schedule=schedule) if schedule else None
            options: dict[str, Any] = {"pipeline": pipeline} if pipeline else {"zero": zero, "recompute": recompute}
            pm = sf.compile(
                model, sf.Mesh("cpu", shape, names=names), data, strategy=strategy, memory_limit="64GiB", **options
            )
            verdict = time.perf_counter() - started  # capture, layouts, lowering, prediction, the check
            predicted = pm.memory().peak
            pm.step(*data)
            measure = measure_pipeline_peak if pipeline else measure_step_peak
            measured = [measure(pm, *data)[0] for _ in range(repeats)]
            name = _name(kind, shape, strategy, zero, recompute, schedule)
            out.append({"case": name, "k": k, "predicted": predicted, "measured": measured, "verdict": verdict})
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
    q = tmp.get_context("spawn").SimpleQueue()
    results += run_world(_rank_main, q, 4, (4, free_port(), args.repeats, q))  # the 2 x 2 hybrid meshes
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
