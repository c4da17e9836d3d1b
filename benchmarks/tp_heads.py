"""Tensor-parallel attention split by head (``Blocked`` q/k/v) against attention kept whole.

The GPT's fused ``c_attn`` is ``Blocked(0, 3)`` under ``strategy="tp"``: each rank computes its heads, and a
block needs Megatron's two all-reduces each way. The peer is the plan torch's ``parallelize_module`` can
run on this model (``ColwiseParallel`` has no layout for a fused projection): attention replicated on every
rank, only the MLP split (shardflow with the hint ``{"transformer.h.*.attn.*": B}``). Same weights and
batch, both compiled in the same processes, steps interleaved A B A B; each timed call is one step, max
over ranks; medians of ``--repeats``. The first step of both must give the same loss as each other.

    .venv/bin/python benchmarks/tp_heads.py [--ranks 2] [--repeats 20] [--markdown]
"""

from __future__ import annotations

import argparse
import copy
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
    x = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    k = torch.distributed.get_world_size()
    mesh = sf.Mesh("cpu", (k,), names=("tp",))
    model = GPT(cfg)
    hint = {"transformer.h.*.attn.*": sf.B}
    whole = sf.compile(copy.deepcopy(model), mesh, example_inputs=(x, x), strategy="tp", hints=hint)
    heads = sf.compile(copy.deepcopy(model), mesh, example_inputs=(x, x), strategy="tp")
    assert heads.layouts["transformer.h.0.attn.c_attn.weight"] == (sf.Blocked(0, 3),)
    a, b = whole.step(x, x), heads.step(x, x)
    if abs(a - b) > 1e-4 * abs(a) + 1e-5:
        raise AssertionError(f"first losses differ: attention whole {a}, split by head {b}")
    for _ in range(warmup):
        whole.step(x, x)
        heads.step(x, x)
    tw: list[float] = []
    th: list[float] = []
    for i in range(repeats):
        order = [(whole, tw), (heads, th)] if i % 2 == 0 else [(heads, th), (whole, tw)]
        for pm, out in order:
            out.append(timed_call(functools.partial(pm.step, x, x)))
    return {"whole": tw, "heads": th}


def _rank(rank: int, world: int, port: int, q: Any, repeats: int, warmup: int) -> None:
    rank_session(rank, world, port, datetime.timedelta(seconds=300), q, lambda: _work(repeats, warmup))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="2", help="world sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    print_preamble()
    rows = []
    for k in [int(r) for r in args.ranks.split(",")]:
        q = mp.get_context("spawn").SimpleQueue()
        got = run_world(_rank, q, k, (k, free_port(), q, args.repeats, args.warmup))
        w, h = statistics.median(got["whole"]), statistics.median(got["heads"])
        rows.append(
            [
                "gpt 4x128, batch 8x64",
                str(k),
                f"{w * 1e3:.1f} (±{spread(got['whole']):.0%})",
                f"{h * 1e3:.1f} (±{spread(got['heads']):.0%})",
                f"{h / w:.2f}",
            ]
        )
    header = ["model", "ranks", "attention whole ms", "split by head ms", "heads / whole"]
    print_table(header, rows, args.markdown)


if __name__ == "__main__":
    main()
