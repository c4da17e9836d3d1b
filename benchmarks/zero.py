"""ZeRO benchmark: shardflow's ZeRO stages (``sf.compile(..., zero=1|2|3)``) against PyTorch FSDP2
(``fully_shard`` per Linear and on the root; ``reshard_after_forward=True`` is ZeRO-3,
``False`` keeps parameters gathered between forward and backward, like ZeRO-2) on the same model and ranks.

Per side: the median step time (steps interleaved across all sides in rotating order), the memory a rank
holds between steps (the storages of its parameters, gradients and optimizer state, counted from the
tensors), and the peak during a step measured by torch's profiler (allocation and free events of one step
on top of what is held; median of ``--repeats``). All sides use AdamW(lr=1e-3, foreach=False) and start
from the same weights; their first losses must agree (rtol 1e-4).

    .venv/bin/python benchmarks/zero.py [--ranks 2,4] [--repeats 15] [--markdown]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
import torch.nn.functional as F
from torch import nn

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks.common import (  # noqa: E402
    free_port,
    print_preamble,
    print_table,
    rank_session,
    run_world,
    timed_call,
)

HEADER = ["side", "ranks", "step ms", "held MiB", "peak MiB (profiler)", "step ms / FSDP2 (same stage)"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 16))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, foreach=False)


def _peak(step: Callable[[], Any]) -> int:
    """Bytes allocated above the start at the worst moment of one ``step()``, from profiler events."""
    from torch.profiler import ProfilerActivity, profile

    from shardflow.testing.memory import profiled_peak

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return profiled_peak(prof)


def _sides(k: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[Callable[[], float], Callable[[], int]]]:
    """name -> (one training step returning the loss, bytes held between steps)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import shardflow as sf
    from shardflow.testing.memory import alive_before_step, storage_bytes

    torch.manual_seed(0)
    model = Net()
    sides: dict[str, tuple[Callable[[], float], Callable[[], int]]] = {}
    mesh = sf.Mesh("cpu", (k,), names=("dp",))
    for zero in (1, 2, 3):
        pm = sf.compile(model, mesh, example_inputs=(x, y), zero=zero, optimizer=_adamw)
        sides[f"shardflow zero={zero}"] = ((lambda pm=pm: pm.step(x, y)), (lambda pm=pm: alive_before_step(pm)))
    device_mesh = init_device_mesh("cpu", (k,))
    rank = dist.get_rank()
    shard = (x.chunk(k)[rank], y.chunk(k)[rank])
    for reshard in (False, True):
        fsdp = copy.deepcopy(model)
        for layer in fsdp.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=device_mesh, reshard_after_forward=reshard)
        fully_shard(fsdp, mesh=device_mesh, reshard_after_forward=reshard)
        opt = _adamw(fsdp.parameters())

        def step(fsdp: nn.Module = fsdp, opt: torch.optim.Optimizer = opt) -> float:
            opt.zero_grad()
            loss = fsdp(*shard)
            loss.backward()
            opt.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            return float(total) / k  # the global-batch loss, as pm.step returns it

        def held(fsdp: nn.Module = fsdp, opt: torch.optim.Optimizer = opt) -> int:
            tensors = [p.to_local() for p in fsdp.parameters()]  # type: ignore[operator]
            tensors += [p.grad.to_local() for p in fsdp.parameters() if p.grad is not None]  # type: ignore[union-attr]
            for state in opt.state.values():
                tensors += [
                    v.to_local() if hasattr(v, "to_local") else v for v in state.values() if isinstance(v, torch.Tensor)
                ]
            return storage_bytes(tensors)

        sides[f"FSDP2 reshard_after_forward={reshard}"] = (step, held)
    return sides


def _bench(k: int, repeats: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 256, generator=gen), torch.randint(0, 16, (64,), generator=gen)
    sides = _sides(k, x, y)
    first = {name: step() for name, (step, _) in sides.items()}
    ref = first["FSDP2 reshard_after_forward=True"]
    bad = {n: v for n, v in first.items() if abs(v - ref) > 1e-4 * abs(ref)}
    if bad:
        raise SystemExit(f"first losses differ from FSDP2's {ref}: {bad}")
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, list[int]] = {n: [] for n in names}
    for i in range(repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for n in order:
            times[n].append(timed_call(sides[n][0]))
    for _ in range(3):
        for n in names:
            peaks[n].append(sides[n][1]() + _peak(sides[n][0]))
    return [
        {
            "side": n,
            "k": k,
            "ms": statistics.median(times[n]) * 1e3,
            "held": sides[n][1](),
            "peak": statistics.median(peaks[n]),
        }
        for n in names
    ]


def _rank_main(rank: int, k: int, port: int, repeats: int, q: Any) -> None:
    rank_session(rank, k, port, timedelta(seconds=300), q, lambda: _bench(k, repeats))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="2")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    print_preamble()
    rows = []
    for k in (int(v) for v in args.ranks.split(",")):
        q = tmp.get_context("spawn").SimpleQueue()
        results = run_world(_rank_main, q, k, (k, free_port(), args.repeats, q))
        peer = {
            1: "FSDP2 reshard_after_forward=False",
            2: "FSDP2 reshard_after_forward=False",
            3: "FSDP2 reshard_after_forward=True",
        }
        by = {r["side"]: r for r in results}
        for r in results:
            ratio = ""
            if r["side"].startswith("shardflow"):
                ratio = f"{r['ms'] / by[peer[int(r['side'][-1])]]['ms']:.2f}"
            rows.append(
                [r["side"], str(k), f"{r['ms']:.1f}", f"{r['held'] / 2**20:.2f}", f"{r['peak'] / 2**20:.2f}", ratio]
            )
    print_table(HEADER, rows, args.markdown)


if __name__ == "__main__":
    main()
