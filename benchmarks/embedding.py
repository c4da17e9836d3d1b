"""Sparse tables: DLRM training throughput with its 26 tables sharded by shardflow (the planner's placements,
fused row-wise Adagrad, the next batch's ids exchanged during the step) against plain PyTorch's way, each
table an ``nn.EmbeddingBag(sparse=True)`` replicated and the model wrapped in DDP, whose sparse gradients
are all-gathered (torch's defaults; ``torch.optim.Adagrad`` on the tables, which takes sparse gradients),
on the Criteo-shaped generator with zipf 1.05 and uniform ids; plus the all-to-all bytes each rank sent
per step against the plan's estimate.

Why not TorchRec: on this machine it installs beside torch 2.13 only as torchrec 1.8.0 with
fbgemm-gpu-cpu 1.8.0 by hand (``--no-deps``; the default resolution pulls the CUDA fbgemm 1.9, which does not
load on torch 2.13), and on CPU it offers no row-wise sharding. The peer here is what a PyTorch user
without TorchRec writes. Both sides start from the same weights, take the same batches and use the same
dense optimizer; their first losses must agree. Steps interleave (each repeat times one step of each, in
alternating order), each timed step is the slowest rank's and includes the arrival of the next batch's ids,
and the table gives medians.

    .venv/bin/python benchmarks/embedding.py [--ranks 1 2 4] [--repeats 20] [--markdown]
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

SCALE = 2e-4  # the largest tables 8,000 rows
DIM = 16
BATCH = 512  # global
LR = 0.02


def _work(alpha: float | None, repeats: int, warmup: int) -> dict[str, Any]:
    import warnings

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import shardflow as sf
    from shardflow.models import DLRM, CriteoShape, DLRMConfig, criteo_batch, dlrm_inputs

    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # torch's Adagrad on sparse gradients
    shape = CriteoShape(scale=SCALE, multi_hot=True, alpha=alpha, seed=11)
    cfg = DLRMConfig(table_rows=shape.table_rows, dim=DIM, bottom=(64, DIM), top=(64, 32), mode="mean")
    batches = [dlrm_inputs(criteo_batch(shape, BATCH, i)) for i in range(warmup + repeats + 1)]
    world, rank = dist.get_world_size(), dist.get_rank()

    torch.manual_seed(0)
    model = DLRM(cfg)
    peer_model = DLRM(DLRMConfig(**{**cfg.__dict__, "sparse": True}))
    peer_model.load_state_dict(model.state_dict())
    mesh = sf.Mesh("cpu", (world,))
    pm = sf.compile(
        model,
        mesh,
        example_inputs=batches[0],
        optimizer=lambda ps: torch.optim.SGD(ps, lr=LR),
        embeddings=sf.Embeddings(tables="tables.*", optimizer=sf.embedding.Adagrad(LR)),
    )
    ddp = DistributedDataParallel(peer_model)
    tables = [p for n, p in peer_model.named_parameters() if n.startswith("tables.")]
    dense = [p for n, p in peer_model.named_parameters() if not n.startswith("tables.")]
    peer_opts = [torch.optim.SGD(dense, lr=LR), torch.optim.Adagrad(tables, lr=LR, eps=1e-10)]
    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world

    def local(b: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The peer's shard of a batch: its samples' ids re-based (the DDP way: each rank reads its own)."""
        out: list[torch.Tensor] = [b[0][lo:hi]]
        for t in range(len(cfg.table_rows)):
            ids, offsets = b[1 + 2 * t], b[2 + 2 * t]
            ends = torch.cat([offsets, torch.tensor([ids.numel()])])
            out += [ids[ends[lo] : ends[hi]], ends[lo:hi] - ends[lo]]
        return (*out, b[-1][lo:hi])

    def peer_step(b: tuple[torch.Tensor, ...]) -> float:
        for o in peer_opts:
            o.zero_grad()
        loss = ddp(*local(b))
        loss.backward()
        for o in peer_opts:
            o.step()
        total = loss.detach() * (hi - lo) / BATCH
        dist.all_reduce(total)  # the global batch's loss, as shardflow reports it
        return float(total)

    shardflow_first = pm.step(*batches[0], next_inputs=batches[1])
    peer_first = peer_step(batches[0])
    if abs(shardflow_first - peer_first) > 1e-4 * abs(peer_first):
        raise AssertionError(f"first losses differ: shardflow {shardflow_first}, peer {peer_first}")
    times: dict[str, list[float]] = {"shardflow": [], "peer": []}
    sent = []
    for i in range(1, warmup + repeats + 1):
        b, nxt = batches[i], batches[i + 1] if i + 1 < len(batches) else None
        sides = [
            ("shardflow", functools.partial(_step_and_prefetch, pm, b, nxt)),
            ("peer", functools.partial(peer_step, b)),
        ]
        for name, fn in sides if i % 2 else sides[::-1]:
            t = timed_call(fn)
            if i > warmup:
                times[name].append(t)
        if i > warmup:
            sent.append(pm.exchange.sent_bytes)
    measured = torch.tensor([statistics.mean(sent)], dtype=torch.float64)
    dist.all_reduce(measured)
    placements = sorted({t.placement for t in pm.plan.tables.values()})
    counts = {p: sum(t.placement == p for t in pm.plan.tables.values()) for p in placements}
    return {
        "times": times,
        "measured": float(measured) / world,
        "expected": pm.expected_bytes(),
        "placements": ", ".join(f"{k} {v}" for k, v in counts.items()),
    }


def _step_and_prefetch(pm: Any, batch: tuple[Any, ...], following: tuple[Any, ...] | None) -> float:
    """A step whose next batch's ids move during it, timed until they have arrived (so that work is this
    side's, not left running into the peer's timed step)."""
    loss = pm.step(*batch, next_inputs=following)
    pm.wait_prefetch()
    return float(loss)


def _rank(rank: int, world: int, port: int, q: Any, alpha: float | None, repeats: int, warmup: int) -> None:
    rank_session(rank, world, port, datetime.timedelta(seconds=600), q, lambda: _work(alpha, repeats, warmup))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    print_preamble()
    print(f"DLRM: 26 tables of the MLPerf Criteo cardinalities x {SCALE} (multi-hot), dim {DIM}, batch {BATCH}")
    rows = []
    for alpha in (1.05, None):
        for n in args.ranks:
            q = mp.get_context("spawn").SimpleQueue()
            got = run_world(_rank, q, n, (n, free_port(), q, alpha, args.repeats, args.warmup))
            sf_s, peer_s = (statistics.median(got["times"][k]) for k in ("shardflow", "peer"))
            rows.append(
                [
                    "zipf 1.05" if alpha else "uniform",
                    str(n),
                    f"{BATCH / sf_s:,.0f} (±{spread(got['times']['shardflow']):.0%})",
                    f"{BATCH / peer_s:,.0f} (±{spread(got['times']['peer']):.0%})",
                    f"{peer_s / sf_s:.2f}",
                    got["placements"],
                    f"{got['measured'] / 2**10:,.1f}",
                    f"{got['expected'] / 2**10:,.1f}",
                ]
            )
    header = [
        "ids",
        "ranks",
        "shardflow samples/s",
        "DDP + EmbeddingBag samples/s",
        "peer time / shardflow",
        "placements (planner)",
        "all-to-all KiB/rank/step",
        "plan's estimate",
    ]
    print_table(header, rows, args.markdown)


if __name__ == "__main__":
    main()
