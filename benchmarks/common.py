"""What every benchmark script shares: free ports, machine facts, noise and markdown tables."""

from __future__ import annotations

import os
import platform
import socket
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def spread(ts: list[float]) -> float:
    """Interquartile range relative to the median: the noise of one side."""
    q = statistics.quantiles(ts, n=4)
    return (q[2] - q[0]) / statistics.median(ts)


def timed_call(fn: Callable[[], Any]) -> float:
    """Seconds of one call, max over ranks; every rank starts after a barrier."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def print_preamble() -> None:
    """Date, machine and the exact command, printed before every table."""
    import datetime
    import shlex
    import sys

    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"machine: {cores()} cores ({cpu_model()}); torch {torch.__version__}, python {platform.python_version()}")
    print(f"command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}", flush=True)


def print_table(header: list[str], rows: list[list[str]], markdown: bool) -> None:
    """The result table: markdown for BENCHMARKS.md, or plain columns."""
    if markdown:
        print_markdown(header, rows)
    else:
        for row in [header, *rows]:
            print("  ".join(row))


def print_markdown(header: list[str], rows: list[list[str]]) -> None:
    """A markdown table; the first two columns are text, the rest right-aligned numbers."""
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" if i < 2 else "---:" for i in range(len(header))) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def rank_session(rank: int, world: int, port: int, timeout: Any, q: Any, work: Callable[[], Any]) -> None:
    """Body of a spawned benchmark rank: join a gloo group, run ``work()``, send rank 0's result (or the
    traceback) to the parent through ``q``, and always tear the group down, leaving together after a
    normal run (a rank that tears gloo down while a peer still talks to it can abort that peer)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}", timeout=timeout)
    ok = False
    try:
        value = work()
        if rank == 0:
            q.put(("ok", value))
        ok = True
    except BaseException:
        if rank == 0:
            q.put(("error", traceback.format_exc()))
        raise
    finally:
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def run_world(rank_main: Callable[..., None], q: Any, k: int, spawn_args: tuple[Any, ...]) -> Any:
    """Spawn ``k`` ranks of ``rank_main`` and return rank 0's answer; exit with rank 0's traceback if any."""
    from torch.multiprocessing.spawn import ProcessException, spawn

    try:
        spawn(rank_main, args=spawn_args, nprocs=k, join=True)
    except ProcessException as exc:
        why = q.get()[1] if not q.empty() else "(rank 0 left no traceback)"
        raise SystemExit(f"benchmark failed on {k} ranks: {exc}\nrank 0: {why}") from None
    status, body = q.get()
    if status != "ok":
        raise SystemExit(f"benchmark failed on rank 0 of {k}:\n{body}")
    return body
