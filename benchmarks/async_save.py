"""Background-snapshot benchmark: how much of a snapshot's cost background saving hides from training,
shardflow (``pm.save(dir, blocking=False)``) against ``torch.distributed.checkpoint.async_save``.

Both sides train the same MLP data parallel on the same ranks (shardflow's ``sf.compile`` dp plan; DDP
with the model and optimizer state from ``get_state_dict`` for DCP), ``--steps`` AdamW steps with a
snapshot every ``--every`` steps, three ways: no snapshots, blocking snapshots, background snapshots (the
last one waited for before the clock stops). Hidden = 1 - (background - none) / (blocking - none): 1.0
means the training loop does not notice the saves. Medians of ``--repeats`` runs, sides interleaved.

    .venv/bin/python benchmarks/async_save.py [--repeats 5] [--markdown]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
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

from benchmarks.common import free_port, print_preamble, print_table, rank_session, run_world  # noqa: E402

HEADER = ["side", "ranks", "state MiB/rank", "no saves s", "blocking s", "background s", "hidden"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(1024, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 16)
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, foreach=False)


def _bench(k: int, args: argparse.Namespace, root: str) -> list[dict[str, Any]]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.nn.parallel import DistributedDataParallel

    import shardflow as sf

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Net()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1024, generator=gen), torch.randint(0, 16, (32,), generator=gen)
    pm = sf.compile(model, sf.Mesh("cpu", (k,), names=("dp",)), example_inputs=(x, y), optimizer=_adamw)
    ddp = DistributedDataParallel(copy.deepcopy(model))
    opt = _adamw(ddp.parameters())
    shard = (x.chunk(k)[rank], y.chunk(k)[rank])
    dcp_group = dist.new_group(backend="gloo")  # DCP's background save talks on a group of its own
    pending: list[Any] = []

    def ddp_step() -> None:
        opt.zero_grad()
        ddp(*shard).backward()
        opt.step()

    def dcp_save(path: str, blocking: bool) -> None:
        model_sd, optim_sd = get_state_dict(ddp, opt)
        state = {"model": model_sd, "optim": optim_sd}
        for f in pending:
            f.result()
        pending.clear()
        if blocking:
            dcp.save(state, checkpoint_id=path)
        else:
            pending.append(dcp.async_save(state, checkpoint_id=path, process_group=dcp_group))

    def run(side: str, mode: str, i: int) -> float:
        base = os.path.join(root, f"{side}-{mode}-{i}")
        dist.barrier()
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            if side == "shardflow":
                pm.step(x, y)
            else:
                ddp_step()
            if mode != "none" and step % args.every == 0:
                path = f"{base}-{step}"
                if side == "shardflow":
                    pm.save(path, blocking=mode == "blocking")
                else:
                    dcp_save(path, blocking=mode == "blocking")
        if side == "shardflow":
            pm.wait_save()
        else:
            for f in pending:
                f.result()
            pending.clear()
        t = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        dist.barrier()
        if rank == 0:
            for name in os.listdir(root):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        dist.barrier()
        return float(t)

    times: dict[tuple[str, str], list[float]] = {}
    runs = [(side, mode) for side in ("shardflow", "DCP") for mode in ("none", "blocking", "background")]
    run("shardflow", "none", -1), run("DCP", "none", -1)  # warm-up
    for i in range(args.repeats):
        for key in runs if i % 2 == 0 else runs[::-1]:
            times.setdefault(key, []).append(run(*key, i))
    state = sum(t.numel() * t.element_size() for t in pm.local_params) * 3  # parameters and Adam's two moments
    out = []
    for side in ("shardflow", "DCP"):
        none, blocking, background = (statistics.median(times[(side, m)]) for m in ("none", "blocking", "background"))
        hidden = 1 - (background - none) / (blocking - none) if blocking > none else float("nan")
        out.append(
            {
                "side": side,
                "k": k,
                "mib": state / 2**20,
                "none": none,
                "blocking": blocking,
                "background": background,
                "hidden": hidden,
            }
        )
    return out


def _rank_main(rank: int, k: int, port: int, args: argparse.Namespace, root: str, q: Any) -> None:
    rank_session(rank, k, port, timedelta(seconds=600), q, lambda: _bench(k, args, root))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    print_preamble()
    rows = []
    for k in (int(v) for v in args.ranks.split(",")):
        with tempfile.TemporaryDirectory(dir=os.environ.get("SF_BENCH_DIR", "/var/tmp")) as root:
            q = tmp.get_context("spawn").SimpleQueue()
            for r in run_world(_rank_main, q, k, (k, free_port(), args, root, q)):
                rows.append(
                    [
                        r["side"],
                        str(k),
                        f"{r['mib']:.1f}",
                        f"{r['none']:.2f}",
                        f"{r['blocking']:.2f}",
                        f"{r['background']:.2f}",
                        f"{r['hidden']:.2f}",
                    ]
                )
    print_table(HEADER, rows, args.markdown)


if __name__ == "__main__":
    main()
