"""Boxing benchmark: shardflow's eager ``redistribute`` against the raw collective and against DTensor.

For every 1-d route of the boxing table (and one cross-mesh route) and every size, three sides move
the same logical tensor, interleaved call by call (A B C, B C A, C A B, ...) so that drift on a busy
machine hits them alike:

- ``shardflow``: ``x.redistribute(dst)`` on a GlobalTensor, eager, with everything a user pays (planning
  cache lookup, autograd Function, wrapper subclass, packing for uneven splits).
- ``raw``: the single torch.distributed call that moves the same bytes, on pre-allocated tensors (for the
  local routes, the plain slice / zero-fill; for the cross-mesh route, send/recv of the same boxes). Its time
  is the floor: shardflow should reach at least 0.9 of its throughput (``raw/sf`` >= 0.9).
- ``DTensor``: ``DTensor.redistribute`` to the equivalent placements (none across meshes: n/a).

Every timed call starts after a barrier; its time is the max over ranks (one MAX all-reduce after the
call, outside the timed region); the table shows medians of ``--repeats`` calls after ``--warmup``.

    .venv/bin/python benchmarks/boxing.py [--sizes 1MB,16MB] [--repeats 20] [--ranks 4] [--markdown]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

# NOTE: run as a script, sys.path[0] is benchmarks/; put the checkout first so that the ranks import this
# tree's shardflow whatever the state of the editable install.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks.common import cores, cpu_model, free_port, print_markdown, rank_session, spread, timed_call  # noqa: E402

COLS = 256  # the logical tensor is (rows, COLS) float32
_PG_TIMEOUT = timedelta(seconds=120)

# torch 2.13 renamed the single-tensor collectives; older versions only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Route:
    name: str
    src: str  # "S0" | "S1" | "B" | "P"
    dst: str
    cross: bool = False  # source on the first half of the ranks, target on the second half


ROUTES = [
    Route("S(0)->B", "S0", "B"),
    Route("P->B", "P", "B"),
    Route("P->S(0)", "P", "S0"),
    Route("S(0)->S(1)", "S0", "S1"),
    Route("B->S(0)", "B", "S0"),
    Route("B->P", "B", "P"),
    Route("S(0)->P", "S0", "P"),
    Route("S(0)->S(0) cross-mesh", "S0", "S0", cross=True),
]

Fn = Callable[[], Any]


# --------------------------------------------------------------------------------------------- rank side


def _placement(code: str) -> Any:
    import shardflow as sf

    return {"S0": sf.S(0), "S1": sf.S(1), "B": sf.B, "P": sf.P}[code]


def _dt_placement(code: str) -> Any:
    from torch.distributed.tensor import Partial, Replicate, Shard

    return {"S0": Shard(0), "S1": Shard(1), "B": Replicate(), "P": Partial()}[code]


def _raw(route: Route, local: torch.Tensor, rows: int, rank: int, k: int) -> Fn:
    """The plain torch call that moves what ``route`` moves, on pre-allocated tensors."""
    if route.cross:
        half = k // 2
        if rank < half:
            send = local.clone()
            return lambda: dist.send(send, dst=rank + half)
        recv = torch.empty((rows // half, COLS))
        return lambda: dist.recv(recv, src=rank - half)
    key = (route.src, route.dst)
    if key == ("S0", "B"):
        inp, out = local.clone(), torch.empty((rows, COLS))
        return lambda: _all_gather_single(out, inp)
    if key == ("P", "B"):
        buf = local.clone()
        return lambda: dist.all_reduce(buf)
    if key == ("P", "S0"):
        inp, out = local.clone(), torch.empty((rows // k, COLS))
        return lambda: _reduce_scatter_single(out, inp)
    if key == ("S0", "S1"):
        inp, out = local.clone().reshape(-1), torch.empty(local.numel())
        return lambda: dist.all_to_all_single(out, inp)
    if key == ("B", "S0"):
        return lambda: local.tensor_split(k)[rank].clone()
    if key == ("B", "P"):
        return lambda: local.clone() if rank == 0 else torch.zeros_like(local)
    if key == ("S0", "P"):
        lo = rank * (rows // k)

        def pad() -> torch.Tensor:
            out = local.new_zeros((rows, COLS))
            out[lo : lo + local.shape[0]] = local
            return out

        return pad
    raise AssertionError(f"no raw side for {route}")


def _dtensor(route: Route, x: Any) -> tuple[Fn | None, str]:
    """DTensor.redistribute to the same placements, or (None, why not)."""
    if route.cross:
        return None, "n/a (DTensor cannot cross meshes)"
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    from shardflow.tensor.dtensor import to_dtensor

    d = to_dtensor(x)
    placements = [_dt_placement(route.dst)]

    def call() -> torch.Tensor:
        out = d.redistribute(d.device_mesh, placements).to_local()
        return out.wait() if isinstance(out, AsyncCollectiveTensor) else out

    try:
        got = d.redistribute(d.device_mesh, placements).full_tensor()
    except Exception as exc:  # noqa: BLE001 -- an unsupported conversion is reported as n/a in the table
        if "internal use only" in str(exc):  # DTensor refuses Replicate/Shard -> Partial for users
            return None, "n/a (DTensor: to Partial is internal-only)"
        return None, f"n/a ({type(exc).__name__}: {str(exc)[:60]})"
    torch.testing.assert_close(got, x.full(), rtol=1e-5, atol=1e-5)
    return call, ""


def _bench_route(route: Route, nbytes: int, k: int, warmup: int, repeats: int) -> dict[str, Any]:
    import shardflow as sf

    rank = dist.get_rank()
    rows = nbytes // (4 * COLS)
    full = torch.randn((rows, COLS), generator=torch.Generator().manual_seed(rows))
    if route.cross:
        half = k // 2
        src_mesh = sf.Mesh("cpu", (half,), ranks=range(half))
        dst_mesh = sf.Mesh("cpu", (half,), ranks=range(half, k))
    else:
        src_mesh = dst_mesh = sf.Mesh("cpu", (k,))
    src, dst = _placement(route.src), _placement(route.dst)
    x = sf.distribute(full, src_mesh, src)
    plan = sf.plan_boxing((rows, COLS), torch.float32, src_mesh, (src,), dst_mesh, (dst,))

    def shardflow_side() -> Any:
        return x.redistribute(dst, mesh=dst_mesh)

    # Check once that the route computes the logical tensor it should (a fast wrong answer is no answer).
    y = shardflow_side()
    got = y.full()
    if rank in dst_mesh:
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)

    sides: dict[str, Fn] = {"sf": shardflow_side, "raw": _raw(route, x._local, rows, rank, k)}
    dt_fn, dt_note = _dtensor(route, x)
    if dt_fn is not None:
        sides["dt"] = dt_fn

    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + repeats):
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate: no side always goes first
        for n in order:
            t = timed_call(sides[n])
            if i >= warmup:
                times[n].append(t)
    med = {n: statistics.median(ts) * 1e3 for n, ts in times.items()}
    return {
        "route": route.name,
        "steps": plan.route,
        "bytes": nbytes,
        "sf_ms": med["sf"],
        "raw_ms": med["raw"],
        "dt_ms": med.get("dt"),
        "dt_note": dt_note,
        "sf_spread": spread(times["sf"]),
    }


def _rank_main(
    rank: int, k: int, port: int, sizes: list[tuple[str, int]], routes: list[Route], warmup: int, repeats: int, q: Any
) -> None:
    def work() -> list[dict[str, Any]]:
        results = []
        for label, nbytes in sizes:
            for route in routes:
                r = _bench_route(route, nbytes, k, warmup, repeats)
                r["size"] = label
                results.append(r)
                if rank == 0:
                    print(f"  {label:>5} {route.name:<24} done", file=sys.stderr, flush=True)
        return results

    rank_session(rank, k, port, _PG_TIMEOUT, q, work)


# --------------------------------------------------------------------------------------------- parent side


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r} should look like 1MB, 512KB or 0.5GB (binary units)")
    unit = (m.group(2) or "B").upper().replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[unit])


def _machine(k: int) -> list[str]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"machine: {cores()} cores ({cpu_model()}), {gpu}; torch {torch.__version__}, python {platform.python_version()}",
        f"setup: gloo on CPU, {k} ranks, 1 thread each, float32 (rows, {COLS}) tensors",
        f"command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}",
    ]
    if k > cores():
        lines.append(f"note: {k} ranks on {cores()} cores are oversubscribed; expect noisy timings")
    return lines


def _rows(results: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in results:
        dt = f"{r['dt_ms']:.2f}" if r["dt_ms"] is not None else r["dt_note"]
        dt_ratio = f"{r['dt_ms'] / r['sf_ms']:.2f}" if r["dt_ms"] is not None else "n/a"
        out.append(
            [
                f"{r['route']} ({r['steps']})",
                r["size"],
                f"{r['sf_ms']:.2f}",
                f"{r['sf_spread'] * 100:.0f}%",
                f"{r['raw_ms']:.2f}",
                dt,
                f"{r['raw_ms'] / r['sf_ms']:.2f}",
                dt_ratio,
            ]
        )
    return out


HEADER = ["route (shardflow steps)", "size", "shardflow ms", "sf IQR", "raw ms", "DTensor ms", "raw/sf", "DTensor/sf"]


def _print_rich(rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="boxing: median ms per call (max over ranks)")
    for i, h in enumerate(HEADER):
        table.add_column(h, justify="left" if i < 2 else "right")
    for row in rows:
        ratio = float(row[6])
        row = row[:6] + [f"[red]{row[6]}[/red]" if ratio < 0.9 else row[6]] + row[7:]
        table.add_row(*row)
    Console(width=max(150, Console().width)).print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1MB,16MB", help="logical tensor sizes, comma-separated (binary units)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per side (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per side first")
    p.add_argument("--ranks", type=int, default=4, help="gloo ranks to spawn (even; divides 256 and the rows)")
    p.add_argument("--routes", default="", help="only routes whose name contains one of these, comma-separated")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown (for BENCHMARKS.md)")
    args = p.parse_args(argv)
    k = args.ranks
    if k < 2 or k % 2 or COLS % k:
        p.error(f"--ranks {k}: need an even number of ranks that divides {COLS} (2, 4, 8, ...)")
    if args.repeats < 5 or args.warmup < 1:
        p.error(f"need --repeats >= 5 and --warmup >= 1, got {args.repeats} and {args.warmup}")
    sizes = []
    for text in args.sizes.split(","):
        try:
            nbytes = _parse_size(text)
        except ValueError as exc:
            p.error(str(exc))
        rows = nbytes // (4 * COLS)
        if rows < k or rows % k or nbytes % (4 * COLS):
            p.error(f"size {text}: {nbytes} bytes is not (rows, {COLS}) float32 with rows a multiple of {k}")
        sizes.append((text.strip(), nbytes))

    wanted = [w.strip() for w in args.routes.split(",") if w.strip()]
    routes = [r for r in ROUTES if not wanted or any(w in r.name for w in wanted)]
    if not routes:
        p.error(f"--routes {args.routes!r} matches none of {[r.name for r in ROUTES]}")

    info = _machine(k)
    print("\n".join(info), flush=True)
    ctx = tmp.get_context("spawn")
    q = ctx.SimpleQueue()
    started = time.perf_counter()
    tmp.spawn(_rank_main, args=(k, free_port(), sizes, routes, args.warmup, args.repeats, q), nprocs=k, join=True)
    status, body = q.get()
    if status != "ok":
        raise SystemExit(f"benchmark failed on rank 0:\n{body}")
    table = _rows(body)
    if args.markdown:
        print_markdown(list(HEADER), table)
    else:
        _print_rich(table)
    print(
        f"(ran {time.perf_counter() - started:.0f} s; raw/sf >= 0.9 is the target, DTensor/sf > 1 means shardflow is faster)"
    )


if __name__ == "__main__":
    main()
