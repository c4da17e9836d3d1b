"""Training benchmark: ``sf.compile(...).step`` against PyTorch's own DDP and tensor parallelism, and the
eager per-op overhead of GlobalTensor against DTensor.

Three families of cases, each with both sides in the same processes, started from the same weights, fed
the same batch, interleaved call by call (A B, B A, ...) so that drift on a busy machine hits them alike:

- ``dp``: ``sf.compile(model, mesh, strategy="dp")`` against ``DistributedDataParallel`` (gloo). Both use
  AdamW(lr=1e-3) with torch's defaults (``foreach=None``, which on CPU tensors is the for-loop
  implementation; shardflow steps it on the local shards) and clip to a global norm of 1.0: DDP with
  ``clip_grad_norm_``'s defaults (``foreach=None``: one ``_foreach_norm`` and one ``_foreach_mul_`` on CPU
  as on GPU), shardflow with the same two foreach calls on its shards. DDP gets this rank's
  shard of the global batch; shardflow gets the same shard wrapped with ``sf.from_local`` (no
  communication). A shardflow step returns the logical loss, so the DDP step also all-reduces its loss.
- ``tp``: ``sf.compile(model, mesh, strategy="tp")`` against ``parallelize_module`` with
  ``ColwiseParallel``/``RowwiseParallel`` on the same Megatron pairs: the MLP's first two linears, and the
  GPT's ``mlp.c_fc``/``mlp.c_proj`` of every block (shardflow gets a hint keeping attention whole, since
  torch's styles cannot split the fused ``c_attn`` by head). No clipping (DTensor's ``clip_grad_norm_``
  refuses a mix of DTensor and plain gradients).
- ``compiled``: the ``dp`` case with both sides compiled: ``sf.compile(..., inductor=True)`` (each rank's
  program through Inductor, communication left out of the trace) against ``torch.compile`` of the DDP
  model (DDPOptimizer splits its graph at the buckets). Not in the default ``--cases`` (compiling takes
  a while); on 2 ranks only.
- ``op``: one small eager op, ``x + y`` (both ``S(0)``) or ``x @ w`` (``S(0)`` by ``B``), on a 1-d mesh of
  two ranks, on GlobalTensors against DTensors of the same layouts; ``--op-iters`` ops per timed call. The
  table gives the overhead per op, i.e. minus the same op on the plain local shards (timed alongside).

Before timing, the first step of both sides must give the same loss (rtol 1e-4; for ``op`` cases, the same
result): a fast wrong answer is no answer. Every timed call starts after a barrier; its time is the max
over ranks (one MAX all-reduce after the call, outside the timed region); the table gives medians of
``--repeats`` calls after ``--warmup``. ``--profile`` instead runs cProfile over shardflow steps on rank 0.

    .venv/bin/python benchmarks/train.py [--ranks 2,4] [--repeats 15] [--warmup 2] [--cases dp,tp,op]
    .venv/bin/python benchmarks/train.py --profile dp-gpt
    .venv/bin/python benchmarks/train.py --ranks 2 --cases compiled
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import io
import os
import platform
import pstats
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
from torch import nn

# NOTE: run as a script, sys.path[0] is benchmarks/; put the checkout first so that the ranks import this
# tree's shardflow whatever the state of the editable install.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks.common import cores, cpu_model, free_port, print_markdown, rank_session, run_world, spread  # noqa: E402

_PG_TIMEOUT = timedelta(seconds=300)
LR = 1e-3
CLIP = 1.0
RTOL = 1e-4

# model and batch of each case (CPU-sized); the GPT's vocabulary is the byte-level one of models.data
GPT_CFG: dict[str, Any] = dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=128)
GPT_BATCH = 8
MLP_CFG: dict[str, Any] = dict(in_features=256, hidden_sizes=(1024, 1024), num_classes=16)
MLP_BATCH = 64
OP_SHAPE = (8, 16)  # tiny: the op costs about a microsecond, so what is timed is the framework around it


@dataclass(frozen=True)
class Case:
    family: str  # "dp" | "compiled" | "tp" | "op"
    what: str  # "gpt" | "mlp" for dp/tp; "add" | "matmul" for op
    ranks: int

    @property
    def name(self) -> str:
        return f"{self.family}-{self.what}"


# what each family is compared with, and its target as peer/shardflow (the project's targets, inverted)
PEER = {"dp": "DDP", "compiled": "compiled DDP", "tp": "parallelize_module", "op": "DTensor"}
TARGET = {"dp": 1.0, "compiled": 1.0, "tp": 1 / 1.05, "op": 2.0}
TARGET_TEXT = {
    "dp": "sf <= 1.0x DDP",
    "compiled": "sf <= 1.0x compiled DDP",
    "tp": "sf <= 1.05x torch TP",
    "op": "sf overhead <= 0.5x DTensor's",
}

Fn = Callable[[], Any]


# --------------------------------------------------------------------------------------------- rank side


def _model_and_batch(what: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    from shardflow.models import GPT, MLP, GPTConfig, MLPConfig

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if what == "gpt":
        model: nn.Module = GPT(GPTConfig(**GPT_CFG))
        seq = GPT_CFG["block_size"]
        tokens = torch.randint(0, GPT_CFG["vocab_size"], (GPT_BATCH, seq + 1), generator=gen)
        return model, (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    model = MLP(MLPConfig(**MLP_CFG))
    x = torch.randn(MLP_BATCH, MLP_CFG["in_features"], generator=gen)
    y = torch.randint(0, MLP_CFG["num_classes"], (MLP_BATCH,), generator=gen)
    return model, (x, y)


def _adamw(params: Any) -> torch.optim.Optimizer:
    # torch's defaults, as its users write it: foreach=None picks the for-loop on CPU tensors
    return torch.optim.AdamW(params, lr=LR)


def _dp_sides(what: str, k: int, compiled: bool = False) -> tuple[Fn, Fn]:
    from torch.nn.parallel import DistributedDataParallel

    import shardflow as sf

    rank = dist.get_rank()
    model, (x, y) = _model_and_batch(what)
    mesh = sf.Mesh("cpu", (k,), names=("dp",))
    pm = sf.compile(model, mesh, (x, y), strategy="dp", optimizer=_adamw, max_grad_norm=CLIP, inductor=compiled)
    xs, ys = x.tensor_split(k)[rank], y.tensor_split(k)[rank]

    def shardflow_step() -> float:
        gx = sf.from_local(xs, mesh, sf.S(0), shape=x.shape)
        gy = sf.from_local(ys, mesh, sf.S(0), shape=y.shape)
        return pm.step(gx, gy)

    ddp = DistributedDataParallel(copy.deepcopy(model))
    opt = _adamw(ddp.parameters())
    forward = torch.compile(ddp) if compiled else ddp

    def ddp_step() -> float:
        loss = forward(xs, ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), CLIP)  # torch's default path, as DDP's users call it
        opt.step()
        total = loss.detach().clone()  # the logical (global-batch) loss, as pm.step returns it
        dist.all_reduce(total)
        return float(total.item()) / k

    return shardflow_step, ddp_step


def _tp_sides(what: str, k: int) -> tuple[Fn, Fn]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import shardflow as sf
    from shardflow.tensor.dtensor import device_mesh

    model, (x, y) = _model_and_batch(what)
    mesh = sf.Mesh("cpu", (k,), names=("tp",))
    if what == "gpt":
        hints: dict[str, Any] = {"transformer.h.*.attn.*": sf.B}
        plan: dict[str, Any] = {}
        for i in range(GPT_CFG["n_layer"]):
            plan[f"transformer.h.{i}.mlp.c_fc"] = ColwiseParallel()
            plan[f"transformer.h.{i}.mlp.c_proj"] = RowwiseParallel()
    else:
        hints, plan = {}, {"net.0": ColwiseParallel(), "net.2": RowwiseParallel()}
    pm = sf.compile(model, mesh, (x, y), strategy="tp", hints=hints, optimizer=_adamw)
    # the same parameters split on both sides, or the comparison is not apples to apples
    split = sorted(n for n, sbp in pm.layouts.items() if sbp != (sf.B,))
    want = sorted(
        f"{m}.{p}" for m in plan for p in ("weight", "bias") if not (m.endswith(("c_proj", "2")) and p == "bias")
    )
    if split != want:
        raise AssertionError(f"shardflow splits {split}, torch's plan splits {want}")

    peer = parallelize_module(copy.deepcopy(model), device_mesh(mesh), plan)
    opt = _adamw(peer.parameters())

    def shardflow_step() -> float:
        return pm.step(x, y)

    def torch_step() -> float:
        loss = peer(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.item())

    return shardflow_step, torch_step


def _op_sides(what: str, k: int, iters: int) -> tuple[Fn, Fn, Fn]:
    import shardflow as sf
    from shardflow.tensor.dtensor import to_dtensor

    mesh = sf.Mesh("cpu", (k,))
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(OP_SHAPE, generator=gen), torch.randn(OP_SHAPE, generator=gen)
    w = torch.randn(OP_SHAPE[1], OP_SHAPE[1], generator=gen)
    ga, gb, gw = sf.distribute(a, mesh, sf.S(0)), sf.distribute(b, mesh, sf.S(0)), sf.distribute(w, mesh, sf.B)
    da, db, dw = to_dtensor(ga), to_dtensor(gb), to_dtensor(gw)
    la, lb, lw = ga._local, gb._local, gw._local

    def loop(op: Callable[[Any, Any], Any], u: Any, v: Any) -> Fn:
        def run() -> Any:
            out = None
            for _ in range(iters):
                out = op(u, v)
            return out

        return run

    op: Callable[[Any, Any], Any] = (lambda u, v: u + v) if what == "add" else (lambda u, v: u @ v)
    second = (gb, db, lb) if what == "add" else (gw, dw, lw)
    sf_fn, dt_fn, local_fn = loop(op, ga, second[0]), loop(op, da, second[1]), loop(op, la, second[2])
    # same layouts and values on both sides
    got_sf, got_dt = sf_fn(), dt_fn()
    if got_sf.sbp != (sf.S(0),) or tuple(got_dt.placements) != (to_dtensor(got_sf).placements[0],):
        raise AssertionError(f"layouts differ: shardflow {got_sf.sbp}, DTensor {got_dt.placements}")
    torch.testing.assert_close(got_sf._local, got_dt.to_local(), rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(got_sf.full(), op(a, second[0].full()), rtol=RTOL, atol=1e-6)
    return sf_fn, dt_fn, local_fn


def _time(fn: Fn) -> tuple[float, Any]:
    """Seconds of one call, max over ranks; every rank starts after a barrier."""
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item()), out


def _check_losses(case: Case, sf_loss: float, peer_loss: float) -> None:
    if abs(sf_loss - peer_loss) > RTOL * abs(peer_loss):
        raise AssertionError(f"{case.name} on {case.ranks} ranks: first-step losses differ, {sf_loss} vs {peer_loss}")


def _bench(case: Case, warmup: int, repeats: int, op_iters: int) -> dict[str, Any]:
    k = case.ranks
    sides: dict[str, Fn]
    if case.family == "op":
        sf_fn, dt_fn, local_fn = _op_sides(case.what, k, op_iters)
        sides = {"sf": sf_fn, "peer": dt_fn, "local": local_fn}
    else:
        if case.family == "tp":
            sf_fn, peer_fn = _tp_sides(case.what, k)
        else:
            sf_fn, peer_fn = _dp_sides(case.what, k, compiled=case.family == "compiled")
        sides = {"sf": sf_fn, "peer": peer_fn}
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + repeats):
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate: no side always goes first
        for n in order:
            t, out = _time(sides[n])
            if case.family != "op":
                losses[n].append(out)
            if i >= warmup:
                times[n].append(t)
        if i == 0 and case.family != "op":
            _check_losses(case, losses["sf"][0], losses["peer"][0])
    med = {n: statistics.median(ts) for n, ts in times.items()}
    row = {"case": case, "sf": med["sf"], "peer": med["peer"], "sf_iqr": spread(times["sf"])}
    row["peer_iqr"] = spread(times["peer"])
    if case.family == "op":  # overhead per op: minus the plain op on the local shards
        row["local"] = med["local"] / op_iters
        row["sf"] = (med["sf"] - med["local"]) / op_iters
        row["peer"] = (med["peer"] - med["local"]) / op_iters
    else:
        row["losses"] = (losses["sf"][0], losses["peer"][0], losses["sf"][-1], losses["peer"][-1])
    return row


def _profile(case: Case, steps: int) -> str:
    """cProfile of ``steps`` shardflow steps (after two warm-up steps) on this rank."""
    if case.family == "tp":
        sf_fn, _ = _tp_sides(case.what, case.ranks)
    else:
        sf_fn, _ = _dp_sides(case.what, case.ranks, compiled=case.family == "compiled")
    for _ in range(2):
        sf_fn()
    dist.barrier()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        sf_fn()
    prof.disable()
    wall = (time.perf_counter() - t0) / steps
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    print(f"{case.name} on {case.ranks} ranks: {wall * 1e3:.1f} ms per step under cProfile ({steps} steps)", file=out)
    for label, (calls, cum) in _summary(stats).items():
        print(f"  per step: {calls / steps:6.0f} x {label:<44} {cum / steps * 1e3:7.1f} ms cumulative", file=out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    return out.getvalue()


# where a shardflow step's time goes: (file suffix, function) -> label; times overlap (dispatch holds the rest)
_WATCH = {
    ("shardflow/tensor/dispatch.py", "dispatch"): "ops through GlobalTensor dispatch",
    ("shardflow/tensor/dispatch.py", "_decide"): "layout decisions not found in the cache",
    ("_pytree.py", "tree_flatten"): "pytree flattens",
    ("_pytree.py", "tree_unflatten"): "pytree unflattens",
    ("shardflow/tensor/global_tensor.py", "_to_grad_layout"): "gradient syncs (post-accumulate hook)",
    ("~", "<built-in method torch._C._distributed_c10d.allreduce>"): "all-reduce launches",
    ("~", "<built-in method torch._C._distributed_c10d.wait>"): "collective waits",
}


def _summary(stats: pstats.Stats) -> dict[str, tuple[int, float]]:
    """(calls, cumulative seconds) of the functions in ``_WATCH``."""
    out = {label: (0, 0.0) for label in _WATCH.values()}
    for (path, _, func), (_, ncalls, _, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        for (suffix, name), label in _WATCH.items():
            if path.endswith(suffix) and func == name:
                calls, total = out[label]
                out[label] = (calls + ncalls, total + cum)
    return out


def _rank_main(
    rank: int, k: int, port: int, cases: list[Case], warmup: int, repeats: int, op_iters: int, profile: int, q: Any
) -> None:
    def work() -> Any:
        if profile:
            return _profile(cases[0], profile)
        results = []
        for case in cases:
            t0 = time.perf_counter()
            results.append(_bench(case, warmup, repeats, op_iters))
            if rank == 0:
                took = time.perf_counter() - t0
                print(f"  {case.name:<10} {k} ranks done ({took:.0f} s)", file=sys.stderr, flush=True)
        return results

    rank_session(rank, k, port, _PG_TIMEOUT, q, work)


# --------------------------------------------------------------------------------------------- parent side


def _machine(rank_counts: list[int]) -> list[str]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"machine: {cores()} cores ({cpu_model()}), {gpu}; torch {torch.__version__}, python {platform.python_version()}",
        f"setup: gloo on CPU, ranks {rank_counts}, 1 thread each; GPT {GPT_CFG} batch {GPT_BATCH}; "
        f"MLP {MLP_CFG} batch {MLP_BATCH}; op shape {OP_SHAPE}",
        f"command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}",
    ]
    over = [k for k in rank_counts if k > cores()]
    if over:
        lines.append(f"note: {over} ranks on {cores()} cores are oversubscribed; expect noisy timings")
    return lines


HEADER = ["case", "ranks", "shardflow", "sf IQR", "peer", "peer IQR", "peer/sf", "target", "met?"]


def _fmt(seconds: float, family: str) -> str:
    return f"{seconds * 1e6:.1f} µs/op" if family == "op" else f"{seconds * 1e3:.1f} ms"


def _rows(results: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in results:
        case: Case = r["case"]
        ratio = r["peer"] / r["sf"]
        target = TARGET[case.family]
        out.append(
            [
                f"{case.name} vs {PEER[case.family]}",
                str(case.ranks),
                _fmt(r["sf"], case.family),
                f"{r['sf_iqr'] * 100:.0f}%",
                _fmt(r["peer"], case.family),
                f"{r['peer_iqr'] * 100:.0f}%",
                f"{ratio:.2f}",
                f">= {target:.2f} ({TARGET_TEXT[case.family]})",
                "yes" if ratio >= target else "no",
            ]
        )
    return out


def _print_plain(rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    for row in [HEADER, *rows]:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def _notes(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in results:
        case: Case = r["case"]
        if case.family == "op":
            out.append(
                f"{case.name} ({case.ranks} ranks): the plain op on the local shard takes {r['local'] * 1e6:.1f} µs"
            )
        else:
            s0, p0, s1, p1 = r["losses"]
            out.append(
                f"{case.name} ({case.ranks} ranks): loss first step sf {s0:.6f} / peer {p0:.6f}, last {s1:.6f} / {p1:.6f}"
            )
    return out


ALL_CASES = [("dp", "gpt"), ("dp", "mlp"), ("tp", "gpt"), ("tp", "mlp"), ("op", "add"), ("op", "matmul")]
ALL_CASES += [("compiled", "gpt"), ("compiled", "mlp")]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="2,4", help="world sizes, comma-separated; tp and op cases run on 2 only")
    p.add_argument("--cases", default="dp,tp,op", help="cases whose name contains one of these, comma-separated")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per side (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per side first (the first is checked)")
    p.add_argument("--op-iters", type=int, default=500, help="eager ops per timed call in op cases")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown (for BENCHMARKS.md)")
    p.add_argument("--profile", default="", help="instead of timing, cProfile shardflow steps of this case")
    p.add_argument("--profile-steps", type=int, default=3, help="steps under cProfile with --profile")
    args = p.parse_args(argv)
    if args.repeats < 10 or args.warmup < 1:
        p.error(f"need --repeats >= 10 and --warmup >= 1, got {args.repeats} and {args.warmup}")
    rank_counts = sorted({int(r) for r in args.ranks.split(",") if r.strip()})
    if any(k < 2 or GPT_BATCH % k or MLP_BATCH % k or OP_SHAPE[0] % k for k in rank_counts):
        p.error(f"--ranks {args.ranks}: each world size must be >= 2 and divide {GPT_BATCH} and {OP_SHAPE[0]}")
    wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
    if any("compiled" in w for w in wanted) and args.warmup < 2:
        p.error("--cases compiled needs --warmup >= 2: shardflow compiles on its second call")
    ctx = tmp.get_context("spawn")

    if args.profile:
        fam, _, what = args.profile.partition("-")
        if (fam, what) not in ALL_CASES or fam == "op":
            p.error(
                f"--profile {args.profile!r}: pick one of dp-gpt, dp-mlp, tp-gpt, tp-mlp, compiled-gpt, compiled-mlp"
            )
        k = rank_counts[0]
        q = ctx.SimpleQueue()
        spawn_args = (k, free_port(), [Case(fam, what, k)], 1, 10, 1, args.profile_steps, q)
        print(run_world(_rank_main, q, k, spawn_args))
        return

    info = _machine(rank_counts)
    print("\n".join(info), flush=True)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for k in rank_counts:
        # tensor parallelism and per-op overhead on 2 ranks only: more ranks than cores only adds noise there
        cases = [
            Case(fam, what, k)
            for fam, what in ALL_CASES
            if (fam == "dp" or k == 2) and (not wanted or any(w in f"{fam}-{what}" for w in wanted))
        ]
        if not cases:
            continue
        q = ctx.SimpleQueue()
        spawn_args = (k, free_port(), cases, args.warmup, args.repeats, args.op_iters, 0, q)
        results += run_world(_rank_main, q, k, spawn_args)
    if not results:
        p.error(f"--cases {args.cases!r} with --ranks {args.ranks} selects nothing")
    table = _rows(results)
    if args.markdown:
        print_markdown(list(HEADER), table)
    else:
        _print_plain(table)
    print("\n".join(_notes(results)))
    print(
        f"(ran {time.perf_counter() - started:.0f} s; medians, max over ranks per call; peer/sf > 1 means shardflow "
        "is faster; op rows are overhead per op above the plain local op)"
    )


if __name__ == "__main__":
    main()
