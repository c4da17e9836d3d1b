"""Checkpoint benchmark: ``shardflow.checkpoint.store.save/load`` against ``torch.distributed.checkpoint``.

The same state on both sides: ``--tensors`` float32 tensors of shape ``(rows, 1024)`` laid out as ``S(0)``
on a 1-d mesh of all ranks, ``--sizes`` MiB in total. shardflow gets the GlobalTensors (made with
``sf.from_local`` from each rank's own random shard), DCP gets the same shards as DTensors
(``to_dtensor``, sharing storage). Save writes into a fresh directory under a temp folder on local disk;
load reads it back in place into zeroed targets of the same layout (not a reshard).

What each side does on disk, with the defaults of both: shardflow writes one safetensors file per rank,
fsyncs every file, then rank 0 computes the SHA-256 of every rank's file for the index, and load verifies
the hash of every file it reads. DCP (``FileSystemWriter``, ``sync_files=True``, one thread) writes one
file per rank and fsyncs it, with no hashing; its save and load each plan collectively first.

The sides take turns (A B, B A, ...); each save and each load starts after a barrier and its time is the
max over ranks; the table gives medians of ``--repeats`` rounds after one warm-up round, whose loads are
checked to give back the saved values on both sides. Each round writes new directories; the previous
round's are removed outside the timed region. Loads read files just written, so mostly the page cache.

    .venv/bin/python benchmarks/checkpoint.py [--ranks 2,4] [--sizes 64,256] [--repeats 5] [--markdown]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

# NOTE: run as a script, sys.path[0] is benchmarks/; put the checkout first (see train.py).
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks.common import cores, cpu_model, free_port, print_markdown, rank_session, run_world, timed_call  # noqa: E402

_PG_TIMEOUT = timedelta(seconds=300)
COLS = 1024
MIB = 1 << 20


def _bench(size_mib: int, n: int, k: int, root: str, repeats: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    import shardflow as sf
    from shardflow.checkpoint import store
    from shardflow.checkpoint.index import sha256
    from shardflow.tensor.dtensor import to_dtensor

    rank = dist.get_rank()
    mesh = sf.Mesh("cpu", (k,))
    rows = size_mib * MIB // 4 // COLS // n
    gen = torch.Generator().manual_seed(1000 + rank)
    src = {
        f"t{i}": sf.from_local(torch.randn(rows // k, COLS, generator=gen), mesh, sf.S(0), shape=(rows, COLS))
        for i in range(n)
    }
    dst = {name: sf.from_local(torch.zeros(rows // k, COLS), mesh, sf.S(0), shape=(rows, COLS)) for name in src}
    src_dt = {name: to_dtensor(t) for name, t in src.items()}
    dst_dt = {
        name: to_dtensor(sf.from_local(torch.zeros(rows // k, COLS), mesh, sf.S(0), shape=(rows, COLS))) for name in src
    }

    def dirs(i: int) -> tuple[str, str]:
        return os.path.join(root, f"sf-{size_mib}-{k}-{i}"), os.path.join(root, f"dcp-{size_mib}-{k}-{i}")

    times: dict[str, list[float]] = {"sf_save": [], "dcp_save": [], "sf_load": [], "dcp_load": []}
    hash_s = 0.0
    for i in range(repeats + 1):
        sf_dir, dcp_dir = dirs(i)
        for t in dst.values():
            t._local.zero_()
        for d in dst_dt.values():
            d.to_local().zero_()
        sides: dict[str, Callable[[], Any]] = {
            "sf_save": lambda d=sf_dir: store.save(d, src),
            "dcp_save": lambda d=dcp_dir: dcp.save(src_dt, checkpoint_id=d),
        }
        loads: dict[str, Callable[[], Any]] = {
            "sf_load": lambda d=sf_dir: store.load(d, dst),
            "dcp_load": lambda d=dcp_dir: dcp.load(dst_dt, checkpoint_id=d),
        }
        for group in (sides, loads):
            names = list(group) if i % 2 == 0 else list(group)[::-1]
            for name in names:
                t = timed_call(group[name])
                if i > 0:
                    times[name].append(t)
        if i == 0:  # the warm-up round checks that both sides give the saved values back
            for name in src:
                if not torch.equal(dst[name]._local, src[name]._local):
                    raise AssertionError(f"shardflow load of {name} differs from what was saved")
                if not torch.equal(dst_dt[name].to_local(), src_dt[name].to_local()):
                    raise AssertionError(f"DCP load of {name} differs from what was saved")
            if rank == 0:  # what one rank's SHA-256 costs (rank 0 hashes every file on save, each rank on load)
                path = os.path.join(sf_dir, "rank00000.safetensors")
                t0 = time.perf_counter()
                sha256(path)
                hash_s = (time.perf_counter() - t0) / os.path.getsize(path)
        dist.barrier()
        if rank == 0:  # outside the timed region: drop this round's directories
            shutil.rmtree(sf_dir, ignore_errors=True)
            shutil.rmtree(dcp_dir, ignore_errors=True)
        dist.barrier()
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"size": size_mib, "ranks": k, "tensors": n, "rows": rows, "hash_s_per_byte": hash_s, **med}


def _rank_main(rank: int, k: int, port: int, sizes: list[int], n: int, root: str, repeats: int, q: Any) -> None:
    def work() -> list[Any]:
        results = []
        for size in sizes:
            t0 = time.perf_counter()
            results.append(_bench(size, n, k, root, repeats))
            if rank == 0:
                print(f"  {size} MiB on {k} ranks done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        return results

    rank_session(rank, k, port, _PG_TIMEOUT, q, work)


HEADER = [
    "case",
    "size",
    "ranks",
    "shardflow save s",
    "DCP save s",
    "DCP/sf",
    "shardflow load s",
    "DCP load s",
    "DCP/sf",
    "GB/s save sf / DCP, load sf / DCP",
]


def _rows(results: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in results:
        nbytes = r["size"] * MIB

        def gbs(s: float, nbytes: int = nbytes) -> str:
            return f"{nbytes / s / 1e9:.2f}"

        out.append(
            [
                f"{r['tensors']} x ({r['rows']}, {COLS}) f32 S(0)",
                f"{r['size']} MiB",
                str(r["ranks"]),
                f"{r['sf_save']:.3f}",
                f"{r['dcp_save']:.3f}",
                f"{r['dcp_save'] / r['sf_save']:.2f}",
                f"{r['sf_load']:.3f}",
                f"{r['dcp_load']:.3f}",
                f"{r['dcp_load'] / r['sf_load']:.2f}",
                f"{gbs(r['sf_save'])} / {gbs(r['dcp_save'])}, {gbs(r['sf_load'])} / {gbs(r['dcp_load'])}",
            ]
        )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="2,4", help="world sizes, comma-separated")
    p.add_argument("--sizes", default="64,256", help="total MiB of the state, comma-separated")
    p.add_argument("--tensors", type=int, default=8, help="tensors in the state")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per side (median reported)")
    p.add_argument("--dir", default=None, help="parent of the temp folder (default: the system temp dir)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown (for BENCHMARKS.md)")
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error(f"need --repeats >= 5, got {args.repeats}")
    rank_counts = sorted({int(r) for r in args.ranks.split(",") if r.strip()})
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        rows = s * MIB // 4 // COLS // args.tensors
        if rows * 4 * COLS * args.tensors != s * MIB or any(rows % k for k in rank_counts):
            p.error(f"--sizes {s}: {args.tensors} tensors of (rows, {COLS}) float32 must split evenly over the ranks")
    root = tempfile.mkdtemp(prefix="sf-ckpt-bench-", dir=args.dir)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(
        f"machine: {cores()} cores ({cpu_model()}), {gpu}; torch {torch.__version__}, python {platform.python_version()}"
    )
    print(f"setup: gloo on CPU, ranks {rank_counts}, 1 thread each; temp dir {root}")
    print(f"command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}", flush=True)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    try:
        ctx = tmp.get_context("spawn")
        for k in rank_counts:
            q = ctx.SimpleQueue()
            results += run_world(_rank_main, q, k, (k, free_port(), sizes, args.tensors, root, args.repeats, q))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = _rows(results)
    if args.markdown:
        print_markdown(HEADER, table)
    else:
        for row in [HEADER, *table]:
            print("  ".join(row))
    hashes = [r["hash_s_per_byte"] for r in results if r["hash_s_per_byte"] > 0]
    if hashes:
        print(f"SHA-256 of one rank's file on rank 0: {1 / statistics.median(hashes) / 1e9:.2f} GB/s")
    print(
        f"(ran {time.perf_counter() - started:.0f} s; medians of {args.repeats} rounds, max over ranks per call; "
        "DCP/sf > 1 means shardflow is faster; GB/s is the whole state over the median time)"
    )


if __name__ == "__main__":
    main()
