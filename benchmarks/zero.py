"""ZeRO benchmark: shardflow's ZeRO stages (``sf.compile(..., zero=1|2|3)``) against what PyTorch offers for
each, on the same model and ranks, every side labelled by what it actually shards:

- ZeRO-1 (optimizer state sharded; parameters and gradients replicated): ``DistributedDataParallel`` with
  ``torch.distributed.optim.ZeroRedundancyOptimizer`` (torch's ZeRO-1, its defaults: each rank updates the
  whole parameters assigned to it and broadcasts them; the assignment is by parameter, so ranks may hold
  unequal shares of the state).
- ZeRO-2 (gradients sharded too; parameters replicated): torch has no such configuration. FSDP2's
  ``fully_shard(reshard_after_forward=False)`` (FSDP1's ``SHARD_GRAD_OP``) does the same collectives per
  step (one all-gather of the parameters, one reduce-scatter of the gradients), but keeps the parameters
  sharded between steps (it holds 16/N bytes per parameter, ZeRO-2 4 + 12/N): another algorithm. shardflow's
  ZeRO-2 is compared with it and with the ZeRO-1 side above (same replicated parameters, gradients
  all-reduced whole); neither is its equal.
- ZeRO-3 (parameters sharded too): FSDP2 ``fully_shard`` with its defaults (``reshard_after_forward=None``:
  each Linear resharded after forward, the root not; the root holds no parameters of its own here).

FSDP2 shards each Linear and the root. Per side: the median step time (steps interleaved across all sides in
rotating order), the memory a rank holds between steps (the storages of its parameters, gradients and
optimizer state, counted from the tensors; DDP's own gradient buckets are not in it), and the peak during a
step counted by the allocator's records of every thread (shardflow/testing/memory.py: tensor bytes above the
step's start, on top of what is held; median of three); both the largest over ranks. All sides use AdamW(lr=1e-3) with torch's defaults (``foreach=None``: the
for-loop on CPU tensors) and start from the same weights; their first losses must agree (rtol 1e-4).

    .venv/bin/python benchmarks/zero.py [--ranks 2,4] [--repeats 15] [--markdown]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from collections.abc import Callable, Iterable
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

# the sides, named by what they shard between steps
ZRO = "DDP + ZeroRedundancyOptimizer (optimizer state sharded: ZeRO-1)"
FSDP_KEEP = "FSDP2 reshard_after_forward=False (params sharded, not resharded after forward)"
FSDP_DEFAULT = "FSDP2 defaults (params sharded, resharded after forward: ZeRO-3)"
SF = {
    1: "shardflow zero=1 (optimizer state sharded)",
    2: "shardflow zero=2 (optimizer state and gradients sharded)",
    3: "shardflow zero=3 (optimizer state, gradients and params sharded)",
}
# step-time ratios printed for each shardflow stage: the same algorithm where torch has it; for ZeRO-2,
# which torch lacks, the two nearest (see the module docstring)
PEERS = {1: [ZRO], 2: [ZRO, FSDP_KEEP], 3: [FSDP_DEFAULT]}
RATIO_COLUMNS = [ZRO, FSDP_KEEP, FSDP_DEFAULT]
HEADER = [
    "side",
    "ranks",
    "step ms",
    "held MiB",
    "peak MiB (allocator)",
    "step / DDP + ZeroRedundancyOptimizer",
    "step / FSDP2 no reshard after forward",
    "step / FSDP2 defaults",
]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 16))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)  # torch's defaults: foreach=None, the for-loop on CPU tensors


def _peak(step: Callable[[], Any]) -> int:
    """Tensor bytes allocated above the start at the worst moment of one ``step()``, any thread, counted by
    the allocator (shardflow.testing.memory), the same way for every side."""
    from shardflow.testing.memory import peak_of

    return peak_of(step)


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct CPU storages behind ``tensors``, counted from the objects."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(seen.values())


def _sf_held(pm: Any) -> int:
    """What a shardflow module holds between steps: parameters, gradients, optimizer state (local shards)."""
    tensors = [p._local for p in pm.params] + [lp.grad for lp in pm.local_params]
    for state in pm.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return storage_bytes(tensors)


def _sides(k: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[Callable[[], float], Callable[[], int]]]:
    """name -> (one training step returning the loss, bytes held between steps)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    import shardflow as sf

    torch.manual_seed(0)
    model = Net()
    sides: dict[str, tuple[Callable[[], float], Callable[[], int]]] = {}
    mesh = sf.Mesh("cpu", (k,), names=("dp",))
    for zero in (1, 2, 3):
        pm = sf.compile(model, mesh, example_inputs=(x, y), zero=zero, optimizer=_adamw)
        sides[SF[zero]] = ((lambda pm=pm: pm.step(x, y)), (lambda pm=pm: _sf_held(pm)))
    rank = dist.get_rank()
    shard = (x.chunk(k)[rank], y.chunk(k)[rank])

    def global_loss(loss: torch.Tensor) -> float:
        total = loss.detach().clone()
        dist.all_reduce(total)
        return float(total) / k  # the global-batch loss, as pm.step returns it

    ddp = DistributedDataParallel(copy.deepcopy(model))
    zro = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)

    def zro_step() -> float:
        zro.zero_grad()
        loss = ddp(*shard)
        loss.backward()
        zro.step()
        return global_loss(loss)

    def zro_held() -> int:
        tensors = list(ddp.parameters()) + [p.grad for p in ddp.parameters() if p.grad is not None]
        for state in zro.optim.state.values():  # the local optimizer: this rank's share of the state
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return storage_bytes(tensors)

    sides[ZRO] = (zro_step, zro_held)
    device_mesh = init_device_mesh("cpu", (k,))
    for name in (FSDP_KEEP, FSDP_DEFAULT):
        fsdp = copy.deepcopy(model)
        options: dict[str, Any] = {"reshard_after_forward": False} if name == FSDP_KEEP else {}  # else defaults
        for layer in fsdp.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=device_mesh, **options)
        fully_shard(fsdp, mesh=device_mesh, **options)
        opt = _adamw(fsdp.parameters())

        def step(fsdp: nn.Module = fsdp, opt: torch.optim.Optimizer = opt) -> float:
            opt.zero_grad()
            loss = fsdp(*shard)
            loss.backward()
            opt.step()
            return global_loss(loss)

        def held(fsdp: nn.Module = fsdp, opt: torch.optim.Optimizer = opt) -> int:
            tensors = [p.to_local() for p in fsdp.parameters()]  # type: ignore[operator]
            tensors += [p.grad.to_local() for p in fsdp.parameters() if p.grad is not None]  # type: ignore[union-attr]
            for state in opt.state.values():
                tensors += [
                    v.to_local() if hasattr(v, "to_local") else v for v in state.values() if isinstance(v, torch.Tensor)
                ]
            return storage_bytes(tensors)

        sides[name] = (step, held)
    return sides


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _bench(k: int, repeats: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 256, generator=gen), torch.randint(0, 16, (64,), generator=gen)
    sides = _sides(k, x, y)
    first = {name: step() for name, (step, _) in sides.items()}
    ref = first[FSDP_DEFAULT]
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
            "held": _max_over_ranks(sides[n][1]()),
            "peak": _max_over_ranks(statistics.median(peaks[n])),
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
        ms = {r["side"]: r["ms"] for r in results}
        for r in results:
            zero = next((z for z, name in SF.items() if name == r["side"]), None)
            ratios = [f"{r['ms'] / ms[c]:.2f}" if zero and c in PEERS[zero] else "" for c in RATIO_COLUMNS]
            rows.append(
                [r["side"], str(k), f"{r['ms']:.1f}", f"{r['held'] / 2**20:.2f}", f"{r['peak'] / 2**20:.2f}", *ratios]
            )
    print_table(HEADER, rows, args.markdown)


if __name__ == "__main__":
    main()
