"""Overlap benchmark: how much of the gradient all-reduce a compiled data-parallel step hides under backward,
and what updating each bucket's parameters during backward (the optimizer actor) buys, against DDP.

Five sides in the same processes, from the same weights, on the same batch shard, interleaved call by call
(the order rotates every repeat), AdamW(lr=1e-3, foreach=False), no clipping (with clipping the updates
wait for the global norm, as the API promises):

- ``sync``: shardflow with every bucket's all-reduce waited for where it is launched (no overlap);
- ``after``: buckets launched asynchronously, waited for after backward, then one optimizer step (DDP's way);
- ``loop``: the default on CPU: each bucket's parameters updated during backward, at the first release
  point after its all-reduce completed, on the compute thread (runtime/updates.py);
- ``actors``: the same actors on threads of their own (the default on GPU);
- ``DDP``: ``DistributedDataParallel`` (gloo), its loss all-reduced as shardflow returns the logical loss.

``all-reduce alone`` is this rank's buckets all-reduced one after another with nothing else running (the
communication a step must carry); ``hidden`` = (sync - after) / all-reduce alone: the share of it that the
asynchronous buckets took off the step's critical path. ``exposed`` is the time the step still waited for
all-reduces after backward ended (from traced steps of the ``after`` side). Medians of ``--repeats``.

    .venv/bin/python benchmarks/overlap.py [--ranks 2] [--repeats 20] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks.common import free_port, print_preamble, print_table, rank_session, run_world, timed_call  # noqa: E402

HEADER = [
    "case",
    "ranks",
    "sync ms",
    "after ms",
    "loop ms",
    "actors ms",
    "DDP ms",
    "all-reduce alone ms",
    "hidden",
    "exposed ms",
    "DDP / loop",
]
SIDES = ("sync", "after", "loop", "actors", "DDP")


def _case(kind: str, world: int) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
    from shardflow.models import GPT, MLP, GPTConfig, MLPConfig

    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=256, dropout=0.0))
        x = torch.randint(0, 512, (4 * world, 64))
        return model, (x, torch.roll(x, -1, 1))
    model = MLP(MLPConfig(in_features=512, hidden_sizes=(1024, 1024, 1024), num_classes=16))
    return model, (torch.randn(64 * world, 512), torch.randint(0, 16, (64 * world,)))


def _opt(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, foreach=False)


def _waited(launch: Callable[..., Any], work: Callable[[Any], Any]) -> Callable[..., Any]:
    def launch_and_wait(*args: Any) -> Any:
        handle = launch(*args)
        if work(handle) is not None:
            work(handle).wait()
        return handle

    return launch_and_wait


@contextlib.contextmanager
def collectives_waited_at_launch() -> Iterator[None]:
    """Programs lowered inside wait for every asynchronous collective where it is launched (gradient
    buckets, reduce-scatter buckets, prefetched gathers): the same buffers and order, no overlap."""
    from shardflow.graph.ir import buckets, gathers

    saved = buckets.launch_all_reduce, buckets.launch_reduce_scatter, gathers.start_plan
    buckets.launch_all_reduce = _waited(saved[0], lambda h: h.work)  # type: ignore[assignment]
    buckets.launch_reduce_scatter = _waited(saved[1], lambda h: h.work)  # type: ignore[assignment]
    gathers.start_plan = _waited(saved[2], lambda h: h.work)  # type: ignore[assignment]
    try:
        yield
    finally:
        buckets.launch_all_reduce, buckets.launch_reduce_scatter, gathers.start_plan = saved


def _measure(kind: str, repeats: int, warmup: int) -> list[str]:
    import shardflow as sf

    rank, world = dist.get_rank(), dist.get_world_size()
    model, (x, y) = _case(kind, world)
    mesh = sf.Mesh("cpu", (world,), names=("dp",))
    shard = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
    gx, gy = (sf.from_local(t[shard], mesh, (sf.S(0),)) for t in (x, y))
    pms = {}
    for side in ("sync", "after", "loop", "actors"):
        pm = sf.compile(copy.deepcopy(model), mesh, example_inputs=(x, y), strategy="dp", optimizer=_opt)
        pm.updates = "after" if side == "sync" else side
        # sync: lowered with launches that wait at once (the same buckets, no overlap)
        with collectives_waited_at_launch() if side == "sync" else contextlib.nullcontext():
            pm.step(gx, gy)
        pms[side] = pm
    ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    ddp_opt = _opt(ddp.parameters())

    def ddp_step() -> float:
        loss = ddp(x[shard], y[shard])
        ddp_opt.zero_grad()
        loss.backward()
        ddp_opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        return float(total) / world

    ddp_step()
    steps = {side: (lambda pm=pm: pm.step(gx, gy)) for side, pm in pms.items()}
    steps["DDP"] = ddp_step
    program = next(iter(pms["actors"].programs.values()))
    sizes = [p.numel() for p in program_buckets(pms["actors"], program)]
    flats = [torch.randn(n) for n in sizes]

    def comm() -> None:
        for f in flats:
            dist.all_reduce(f)

    times: dict[str, list[float]] = {s: [] for s in [*SIDES, "comm"]}
    order = [*SIDES, "comm"]
    for i in range(warmup + repeats):
        for side in order[i % len(order) :] + order[: i % len(order)]:
            t = timed_call(comm if side == "comm" else steps[side])
            if i >= warmup:
                times[side].append(t)
    losses = [steps[s]() for s in SIDES]  # every side has taken as many steps from the same weights
    if max(losses) - min(losses) > 1e-3 * abs(losses[0]) + 1e-4:
        raise AssertionError(f"{kind}: the sides' losses drifted apart: {dict(zip(SIDES, losses))}")
    exposed = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for _ in range(max(5, repeats // 4)):
            pms["after"].step(gx, gy, trace=os.path.join(tmpdir, "t.json"))
            waits = [e for e in pms["after"].events if e.name == "wait for all-reduce" and e.rank == rank]
            exposed.append(sum(e.end_ns - e.start_ns for e in waits) / 1e6)
    med = {s: statistics.median(v) * 1e3 for s, v in times.items()}
    hidden = (med["sync"] - med["after"]) / med["comm"]
    return [
        kind,
        str(world),
        *(f"{med[s]:.1f}" for s in SIDES),
        f"{med['comm']:.1f}",
        f"{hidden:.2f}",
        f"{statistics.median(exposed):.1f}",
        f"{med['DDP'] / med['loop']:.2f}",
    ]


def program_buckets(pm: Any, program: Any) -> list[torch.Tensor]:
    """One flat tensor per gradient bucket of ``program`` (the sizes the step all-reduces)."""
    out = []
    for ks, bucket in program.units:
        if bucket:
            out.append(torch.empty(sum(pm.local_params[program.grad_of[k]].numel() for k in ks)))
    return out


def _rank_main(rank: int, world: int, port: int, q: Any, cases: list[str], repeats: int, warmup: int) -> None:
    def work() -> list[list[str]]:
        return [_measure(kind, repeats, warmup) for kind in cases]

    rank_session(rank, world, port, timedelta(seconds=300), q, work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="2")
    parser.add_argument("--cases", default="gpt,mlp")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    print_preamble()
    rows = []
    for k in (int(r) for r in args.ranks.split(",")):
        q = tmp.get_context("spawn").SimpleQueue()
        started = time.perf_counter()
        rows += run_world(_rank_main, q, k, (k, free_port(), q, args.cases.split(","), args.repeats, args.warmup))
        print(f"{k} ranks: {time.perf_counter() - started:.0f} s", flush=True)
    print_table(HEADER, rows, args.markdown)


if __name__ == "__main__":
    main()
