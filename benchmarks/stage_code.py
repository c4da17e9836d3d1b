"""How pipeline stages run their traced code: the graph's generated Python (shardflow's choice,
``runtime/stages.py``) against ``torch.fx.Interpreter`` node by node (torch's default for the submodules
torch.export outlines, which ``torch.distributed.pipelining`` runs as they come).

The same compiled pipeline (a GPT cut before its third block, 2 ranks, 1F1B over 4 micro-batches, AdamW),
its stage modules switched between the two ways step by step; both run the same ATen ops, so only the
host's time per op differs. Steps interleaved (each side first in turn), each timed step after a barrier and
the slowest rank's; medians of ``--repeats``.

    .venv/bin/python benchmarks/stage_code.py [--repeats 20] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as tmp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    free_port,
    print_preamble,
    print_table,
    rank_session,
    run_world,
    spread,
    timed_call,
)

HEADER = ["model", "ranks", "fx.Interpreter ms", "generated code ms", "interpreter / generated", "noise i/g"]
SIZES = [(64, 8, 32), (128, 16, 64)]  # (n_embd, batch, seq)


def _bench(n_embd: int, batch: int, seq: int, args: argparse.Namespace) -> dict[str, Any]:
    from torch.export.unflatten import InterpreterModule

    import shardflow as sf
    from shardflow.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=seq, n_layer=4, n_head=4, n_embd=n_embd))
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (batch, seq), generator=gen)
    y = torch.roll(x, -1, 1)
    pm = sf.compile(
        model,
        sf.Mesh("cpu", (2,), names=("pp",)),
        example_inputs=(x, y),
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
        pipeline=sf.Pipeline(split_points=["transformer.h.2"], micro_batches=4, schedule="1f1b"),
    )
    outlined = [m for module in pm.modules.values() for m in module.modules() if isinstance(m, InterpreterModule)]
    if not outlined or any(m._run_with_interpreter for m in outlined):
        raise SystemExit("the stage modules are not set to run generated code: runtime/stages.py changed?")

    def step(interpreter: bool) -> None:
        for m in outlined:
            m._run_with_interpreter = interpreter
        pm.step(x, y)

    for _ in range(args.warmup):
        step(True), step(False)
    ts: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.repeats):
        for side in (True, False) if i % 2 == 0 else (False, True):
            ts[side].append(timed_call(lambda side=side: step(side)))
    step(False)  # leave it as shardflow runs it
    return {
        "model": f"gpt 4x{n_embd}, batch {batch}x{seq}, 1f1b m=4",
        "interpreter": statistics.median(ts[True]),
        "generated": statistics.median(ts[False]),
        "noise": (spread(ts[True]), spread(ts[False])),
    }


def _rank_main(rank: int, k: int, port: int, args: argparse.Namespace, q: Any) -> None:
    from datetime import timedelta

    torch.set_num_threads(1)
    rank_session(rank, k, port, timedelta(seconds=600), q, lambda: [_bench(*size, args) for size in SIZES])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    print_preamble()
    q = tmp.get_context("spawn").SimpleQueue()
    rows = []
    for r in run_world(_rank_main, q, 2, (2, free_port(), args, q)):
        rows.append(
            [
                r["model"],
                "2",
                f"{r['interpreter'] * 1e3:.1f}",
                f"{r['generated'] * 1e3:.1f}",
                f"{r['interpreter'] / r['generated']:.2f}",
                f"{r['noise'][0]:.2f}/{r['noise'][1]:.2f}",
            ]
        )
    print_table(HEADER, rows, args.markdown)


if __name__ == "__main__":
    main()
