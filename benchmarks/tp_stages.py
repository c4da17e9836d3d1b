"""Tensor-parallel pipeline stages (each stage a lowered program over its ``tp`` ranks) against the same
pipeline with data-parallel stages, on the same 4 ranks.

A 2 x 2 mesh as ``("pp", "tp")`` under ``strategy="tp"`` or as ``("pp", "dp")`` under ``"dp"``: the same GPT,
cut before the same block, 1F1B over 4 micro-batches. The data-parallel stages are the reference: each
rank computes half the rows with no communication inside a stage; a tp stage computes half of every
matrix and all-reduces twice per block each way (Megatron), so on 2 cores shared by 4 ranks its cost is
mostly those synchronisations. Steps interleaved A B A B; each timed call is one step, max over ranks;
medians of ``--repeats``. Both must give the same first loss.

    .venv/bin/python benchmarks/tp_stages.py [--repeats 20] [--markdown]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import free_port, print_preamble, print_table, rank_session, run_world, spread, timed_call


def _work(repeats: int, warmup: int) -> dict[str, Any]:
    import shardflow as sf
    from shardflow.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (16, 64), generator=gen), torch.randint(0, 256, (16, 64), generator=gen)
    pms = {}
    for axis, strategy in (("tp", "tp"), ("dp", "dp")):
        torch.manual_seed(0)
        mesh = sf.Mesh("cpu", (2, 2), names=("pp", axis))
        pipeline = sf.Pipeline(micro_batches=4, schedule="1f1b", split_points=["transformer.h.2"])
        pms[axis] = sf.compile(GPT(cfg), mesh, example_inputs=(x, y), pipeline=pipeline, strategy=strategy)
    a, b = pms["tp"].step(x, y), pms["dp"].step(x, y)
    if abs(a - b) > 1e-4 * abs(a) + 1e-5:
        raise AssertionError(f"first losses differ: tp stages {a}, dp stages {b}")
    for _ in range(warmup):
        for pm in pms.values():
            pm.step(x, y)
    times: dict[str, list[float]] = {"tp": [], "dp": []}
    for i in range(repeats):
        for axis in ("tp", "dp") if i % 2 == 0 else ("dp", "tp"):
            times[axis].append(timed_call(functools.partial(pms[axis].step, x, y)))
    return times


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
    got = run_world(_rank, q, 4, (4, free_port(), q, args.repeats, args.warmup))
    tp, dp = statistics.median(got["tp"]), statistics.median(got["dp"])
    rows = [
        [
            "gpt 4x128, batch 16x64, 1f1b m=4",
            "4 (2 stages x 2)",
            f"{tp * 1e3:.1f} (±{spread(got['tp']):.0%})",
            f"{dp * 1e3:.1f} (±{spread(got['dp']):.0%})",
            f"{tp / dp:.2f}",
        ]
    ]
    header = ["model", "ranks", "tp stages ms", "dp stages ms", "tp / dp"]
    print_table(header, rows, args.markdown)


if __name__ == "__main__":
    main()
