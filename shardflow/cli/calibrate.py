"""Measure this machine's device profile (``shardflow calibrate``): compute, memory and links, as a job sees them.

Compute is timed in this process with the intra-op threads one rank gets when ``ranks`` ranks share the machine
(the launcher's share), as medians of batches of calls after a warm-up: element-wise FLOP/s from an add whose
operands stay in cache, memory bandwidth from one that streams. Links are timed on ``ranks`` pooled ranks
(``shardflow.testing``) through shardflow's own collectives on a mesh's groups, a barrier before each call
and the slowest rank kept, then fitted as latency + bus bytes / bus bandwidth. On a CPU, what real compiled
steps of calibrate's own small models cost beyond their ops (timed here) and links is fitted last
(``shardflow/cli/step_fits.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
import time
from collections.abc import Callable
from datetime import datetime
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from shardflow.cli.launch import _threads_per_worker
from shardflow.cli.step_fits import in_step_fit, pipeline_fit, runtime_fit
from shardflow.comm import collectives as C
from shardflow.comm.groups import GroupHandle, group_for
from shardflow.cost.profile import (
    KINDS,
    OP_CLASSES,
    DeviceProfile,
    LinkFit,
    bus_factor,
    datasheet,
    machine_name,
    shipped,
)
from shardflow.ops.flop_count import in_flops
from shardflow.placement.mesh import Mesh
from shardflow.runtime.meter import _sync, rank_threads
from shardflow.testing import run_on_ranks  # pooled ranks: a process group started once and kept warm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# per device type: matmul sizes, conv input and weight, attention (B, H, L, D), elements of the cached and the
# streamed add (a CPU rank's L2 holds 3 x 64K floats; 3 x 16M floats are far beyond any cache)
_SHAPES = {
    "cpu": ((256, 512, 1024), (8, 64, 32, 32), (64, 64, 3, 3), (4, 8, 256, 64), 1 << 16, 1 << 24),
    "cuda": ((2048, 4096, 8192), (32, 128, 56, 56), (128, 128, 3, 3), (8, 16, 2048, 128), 1 << 22, 1 << 28),
}
SIZES = tuple(1 << k for k in range(10, 25, 2))  # bytes of the full piece: 1 KiB to 16 MiB, x4 apart
QUICK_SIZES = (1 << 10, 1 << 14, 1 << 18, 1 << 22, 1 << 24)


def calibrate(ranks: int = 2, backend: str | None = None, quick: bool = False, device: str = "cpu") -> DeviceProfile:
    """This machine's profile for jobs of ``ranks`` local ranks on ``device`` (``"cpu"``: gloo, ``"cuda"``:
    nccl unless ``backend`` says otherwise); ``quick`` measures fewer sizes and repeats (seconds on a CPU). The
    ranks stay pooled for a next call until this process ends (``shardflow.testing.shutdown_pools`` ends them)."""
    if not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be a positive int, got {ranks!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if backend not in ("gloo", "nccl") or backend == "nccl" and device != "cuda":
        raise ValueError(f"backend {backend!r} cannot run on {device!r}: use gloo on cpu, nccl (or gloo) on cuda")
    if device == "cuda":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            raise ValueError("device 'cuda' (and nccl) needs a CUDA GPU, and this machine has none: use --device cpu")
        if backend == "nccl" and ranks > gpus:
            raise ValueError(f"nccl needs a GPU per rank: {ranks} ranks, {gpus} GPU(s) here; use --ranks {gpus}")
    dev = torch.device(device)
    threads = _threads_per_worker(ranks) if device == "cpu" else 0
    with rank_threads(threads):  # a rank's share of the cores, as the launcher gives it
        flops, bandwidth, launch = _compute(dev, quick)
    links = _link_fits(ranks, backend, quick, device, threads) if ranks > 1 else Links((), 0.0, 1.0)
    if device == "cpu":
        name = machine_name()
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // ranks
        node = max(os.cpu_count() or 1, ranks)
    else:
        name = _gpu_name(torch.cuda.get_device_name(dev))
        memory = torch.cuda.get_device_properties(dev).total_memory
        node = max(torch.cuda.device_count(), ranks)
    how = f"{'quick' if quick else 'full'}, torch {torch.__version__}, {ranks} {backend} rank(s)"
    per_rank = f"{threads} thread(s) per rank" if threads else torch.cuda.get_device_name(dev)
    profile = DeviceProfile(
        name=name,
        device_type=device,
        source=f"measured by shardflow calibrate on {datetime.now():%Y-%m-%d %H:%M} ({how}, {per_rank})",
        calibrated=True,
        flops=flops,
        memory_bandwidth=bandwidth,
        launch=launch,
        memory_bytes=int(memory),
        collectives=links.fits,
        node_size=node if links.fits else 1,  # one rank: no collective was measured, so no group is priced
        in_step=links.in_step,
        overlap=links.overlap,
        threads=threads,
    )
    if device == "cpu":
        with rank_threads(threads):
            profile = dataclasses.replace(profile, **runtime_fit(profile, quick)._asdict())
            if ranks >= 2:  # in that order: a pipeline's sends pay the in-step cost too
                profile = dataclasses.replace(profile, **in_step_fit(profile, quick, ranks)._asdict())
                profile = dataclasses.replace(profile, pipeline_action=pipeline_fit(profile, quick))
            profile = dataclasses.replace(profile, ranks=ranks)  # after the fits, which price other sizes
    return _with_datasheet(profile)


def _with_datasheet(profile: DeviceProfile) -> DeviceProfile:
    """A GPU calibrated on one machine keeps its datasheet's network fits, node size (where it measured
    fewer ranks) and peaks: one machine cannot measure links between nodes."""
    sheet = datasheet(profile.name) if profile.device_type == "cuda" else None
    if sheet is None:
        return profile
    return dataclasses.replace(
        profile,
        collectives=profile.collectives or sheet.collectives,
        node_size=max(profile.node_size, sheet.node_size),
        network=sheet.network,
        peaks=sheet.peaks,
        notes=(*profile.notes, "network fits, node size and peaks: the shipped datasheet's"),
    )


def _seconds(fn: Callable[[], object], budget: float, dev: torch.device) -> float:
    """Median seconds of one call of ``fn`` after a warm-up: calls are timed in batches of at least ~1 ms (the
    clock and Python's loop do not count), at least 3 batches and as many more as ``budget`` seconds allow."""
    fn()
    _sync(dev)
    start = time.perf_counter()
    fn()
    _sync(dev)
    inner = max(1, math.ceil(1e-3 / max(time.perf_counter() - start, 1e-8)))
    samples: list[float] = []
    end = time.perf_counter() + budget
    while len(samples) < 3 or time.perf_counter() < end and len(samples) < 30:
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(dev)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def _compute(dev: torch.device, quick: bool) -> tuple[dict[str, dict[str, float]], float, float]:
    """FLOP/s per op class and dtype, memory bytes/s and the launch floor, on ``dev``."""
    budget = 0.08 if quick else 0.5
    flops: dict[str, dict[str, float]] = {c: {} for c in OP_CLASSES}
    for name, dtype in DTYPES.items():
        # in quick mode, a dtype whose matmuls are emulated (slower than float32's) would take too long
        floor = flops["matmul"].get("float32", 0.0) / 2 if quick else 0.0
        if name == "float32" or _runs(dtype, dev, floor):
            for op_class, rate in _rates(dtype, dev, budget).items():
                flops[op_class][name] = rate
    u, v = (torch.randn(_SHAPES[dev.type][-1], device=dev) for _ in range(2))
    # bytes per second do not depend on the dtype: one streaming float32 add, 2 reads + 1 write per element
    bandwidth = 3 * u.nbytes / _seconds(functools.partial(torch.add, u, v, out=u), budget, dev)
    one = torch.ones(1, device=dev)
    return flops, bandwidth, _seconds(functools.partial(torch.add, one, one), budget, dev)


def _runs(dtype: torch.dtype, dev: torch.device, floor: float) -> bool:
    """Whether a small matmul in ``dtype`` runs here at ``floor`` FLOP/s or more."""
    n = _SHAPES[dev.type][0][0]
    try:
        a = torch.randn(n, n, dtype=dtype, device=dev)
        return 2 * n**3 / _seconds(functools.partial(torch.mm, a, a), 0.0, dev) >= floor
    except RuntimeError:  # the dtype does not run here at all
        return False


def _rates(dtype: torch.dtype, dev: torch.device, budget: float) -> dict[str, float]:
    """FLOP/s per op class in ``dtype``; an op class not implemented for it is left out (the cost model then
    takes float32's)."""
    mm_sizes, x_shape, w_shape, (b, h, length, d), cached, _ = _SHAPES[dev.type]

    def new(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, device=dev)

    x, w, q, u, v = new(*x_shape), new(*w_shape), new(b, h, length, d), new(cached), new(cached)
    macs = math.prod(x_shape) // x_shape[1] * w_shape[0] * math.prod(w_shape[1:])  # N*H*W x Cout x Cin*kh*kw
    work: dict[str, list[tuple[float, Callable[[], object]]]] = {
        # several sizes, the best kept: small matmuls pay for packing and threading, large ones reach the rate
        "matmul": [(2 * n**3, functools.partial(torch.mm, new(n, n), new(n, n))) for n in mm_sizes],
        "conv": [(2 * macs, functools.partial(F.conv2d, x, w, padding=w_shape[-1] // 2))],
        "attention": [(4 * b * h * length * length * d, functools.partial(F.scaled_dot_product_attention, q, q, q))],
        "vector": [(cached, functools.partial(torch.add, u, v, out=u))],  # 1 FLOP per element, operands in cache
    }
    rates = {}
    for op_class, cases in work.items():
        try:
            rates[op_class] = max(n / _seconds(fn, budget, dev) for n, fn in cases)
        except RuntimeError:
            pass
    return rates


def _gpu_name(device_name: str) -> str:
    """A GPU's profile name: the shipped datasheet's it matches (``"h100"``), else its name in lower case."""
    for known in shipped():
        if known.upper() in device_name.upper():
            return known
    return "-".join(device_name.lower().replace("nvidia", "").split())


class Links(NamedTuple):
    """The fitted links, and what a collective costs inside a step beyond them (``DeviceProfile`` fields)."""

    fits: tuple[LinkFit, ...]
    in_step: float
    overlap: float


def _link_fits(ranks: int, backend: str, quick: bool, device: str, threads: int) -> Links:
    """Fits of every kind on groups of ``ranks`` (and of pairs, above 3 ranks unless ``quick``), and the
    in-step cost and overlap of a small all-reduce between bursts of compute (``in_step``)."""
    sizes, reps = (QUICK_SIZES, 10) if quick else (SIZES, 20)
    widths = (ranks, 2) if ranks >= 4 and not quick else (ranks,)
    per_rank = run_on_ranks(ranks, time_links, sizes, reps, widths, threads, device, backend, timeout=600)
    points: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for rows in zip(*per_rank):  # one row, the same (kind, group size, bytes) on every rank
        kind, k, nbytes, _ = rows[0]
        points.setdefault((kind, k), []).append((nbytes, max(r[3] for r in rows)))  # the slowest rank
    # in rounds seconds apart, the median round: this cost comes and goes with the machine's scheduling
    reps, n = (200, 1) if quick else (600, 3)
    rounds = [run_on_ranks(ranks, in_step, reps, threads, device, backend, timeout=600) for _ in range(n)]
    return Links(
        tuple(_fit(kind, k, p) for (kind, k), p in points.items()),
        statistics.median(max(r.in_step for r in per) for per in rounds),
        statistics.median(min(r.overlap for r in per) for per in rounds),
    )


class InStep(NamedTuple):
    in_step: float  # seconds a collective issued after compute costs beyond one issued back to back
    overlap: float  # the share of a started collective that compute in the meantime hides


def in_step(reps: int, threads: int, device: str, backend: str) -> InStep:
    """On every rank of a pool: a 1 KiB all-reduce issued back to back, and after bursts of compute (4 to 32
    small matmuls, as a step issues its collectives), each call timed alone: the mean difference is what a
    collective costs inside a step beyond its link fit (a rank whose thread slept waits to be woken, and
    now and then for the other's; the mean, since a step pays the tail too). Then the same all-reduce
    started before a burst and waited for after a second one, against issuing it between the two: the
    time saved, against the in-step collective it could hide, is the overlap."""
    rank, dev = dist.get_rank(), _rank_device(device)
    with rank_threads(threads):
        g = _group(Mesh(device, (1, dist.get_world_size())), rank, backend)  # collective: makes its groups
        assert g is not None
        group, x, a = g.group, torch.ones(256, device=dev), torch.randn(128, 128, device=dev)

        def burst(n: int) -> None:
            for _ in range(n):
                a @ a
            _sync(dev)

        def call() -> float:
            start = time.perf_counter()
            dist.all_reduce(x, group=group)
            _sync(dev)
            return time.perf_counter() - start

        def started(n: int) -> float:
            start = time.perf_counter()
            burst(n)
            work = dist.all_reduce(x, group=group, async_op=True)
            burst(n)
            work.wait()
            _sync(dev)
            return time.perf_counter() - start

        def between(n: int) -> float:
            start = time.perf_counter()
            burst(n)
            call()
            burst(n)
            return time.perf_counter() - start

        dist.barrier()
        alone = statistics.mean(call() for _ in range(reps))
        after, saved = [], []
        for i in range(reps):
            n = 4 << i % 4
            burst(n)
            after.append(call())
            saved.append(between(n) - started(n))
    extra = max(statistics.mean(after) - alone, 0.0)
    return InStep(extra, min(max(statistics.mean(saved) / statistics.mean(after), 0.0), 1.0))


def _fit(kind: str, k: int, points: list[tuple[int, float]]) -> LinkFit:
    """Least squares of seconds against bus bytes, weighted by 1/seconds: relative errors, so that 1 KiB's
    microseconds (the latency) count as much as 16 MiB's milliseconds (the bandwidth)."""
    x = np.array([bus_factor(kind, k) * nbytes for nbytes, _ in points])
    y = np.array([s for _, s in points])
    a = np.stack([np.ones_like(x), x], axis=1) / y[:, None]
    (latency, slope), *_ = np.linalg.lstsq(a, np.ones_like(y), rcond=None)
    bandwidth = 1 / slope if slope > 0 else x[-1] / y[-1]  # a flat fit (noise): the largest size's rate
    return LinkFit(kind, k, max(float(latency), 1e-6), float(bandwidth))


def time_links(
    sizes: tuple[int, ...], reps: int, widths: tuple[int, ...], threads: int, device: str, backend: str
) -> list[tuple[str, int, int, float]]:
    """On every rank of a pool: ``(kind, group size, bytes, median seconds)`` of each collective on each size,
    groups of each width side by side (as a mesh axis runs them), the same rows in the same order on every rank."""
    rank, world, dev = dist.get_rank(), dist.get_world_size(), _rank_device(device)
    out: list[tuple[str, int, int, float]] = []
    with rank_threads(threads):
        for k in widths:
            mesh = Mesh(device, (world // k, k), ranks=range(world // k * k))  # collective: makes its groups
            g, me = _group(mesh, rank, backend), rank % k
            for kind in KINDS:
                if kind == "send_recv" and k != widths[-1]:
                    continue  # pairs, once: group (2i, 2i+1) sends one way
                for nbytes in sizes:
                    m = max(1, nbytes // 4 // k)  # float32 elements of one rank's piece
                    fn = _call(kind, m, k, me, g, dev) if g is not None else lambda: None
                    out.append((kind, 2 if kind == "send_recv" else k, 4 * m * k, _timed(fn, reps, dev)))
    return out


def _rank_device(device: str) -> torch.device:
    """This pooled rank's device: the CPU, or its GPU (made current)."""
    if device != "cuda":
        return torch.device("cpu")
    dev = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return dev


def _group(mesh: Mesh, rank: int, backend: str) -> GroupHandle | None:
    """This rank's group along the mesh's last axis (None: not in the mesh); nccl groups made here, on every rank."""
    if backend == "nccl":  # the pool's process groups are gloo ones
        made = {s: dist.new_group(list(s), backend="nccl") for s in mesh.all_axis_slices(1)}
        return next((GroupHandle(s, pg, tuple(range(len(s)))) for s, pg in made.items() if rank in s), None)
    return group_for(mesh.axis_slice(1, rank)) if rank in mesh else None


def _call(kind: str, m: int, k: int, me: int, g: GroupHandle, dev: torch.device) -> Callable[[], object]:
    """One call of ``kind`` moving ``m`` float32 elements per rank's piece, in the layouts that copy nothing
    beyond what the collective itself needs (a layout's pack or ``torch.cat`` is compute, not link)."""
    x = torch.ones(m * k, device=dev)
    if kind == "all_reduce":
        return lambda: C.all_reduce(x, g)
    if kind == "all_gather":
        return lambda: C.all_gather(x[:m], 0, [m] * k, g)
    if kind == "reduce_scatter":
        return lambda: C.reduce_scatter(x, 0, [m] * k, me, g)
    if kind == "all_to_all":
        return lambda: C.all_to_all(x.view(1, m * k), 0, 1, [1] * k, [m] * k, me, g)
    peer = g.ranks[me ^ 1] if me ^ 1 < k else None  # send_recv: even members send to the next one
    if peer is None:
        return lambda: None
    if dist.get_backend(g.group) == "nccl":  # exchange posts on the default group: the pool's gloo one
        return functools.partial(dist.send if me % 2 == 0 else dist.recv, x, peer, g.group)
    if me % 2 == 0:
        return lambda: C.exchange([(peer, x, 0)], [])
    return lambda: C.exchange([], [(peer, x, 0)])


def _timed(fn: Callable[[], object], reps: int, dev: torch.device) -> float:
    """Median seconds of ``fn`` over ``reps`` calls, each after a barrier of the whole pool (after a warm-up)."""
    fn()
    times = []
    for _ in range(reps):
        _sync(dev)
        dist.barrier()
        start = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(profile: DeviceProfile) -> str:
    """A profile for people: rates per op class and dtype, memory, launch, and every collective fit."""
    dtypes = [d for d in DTYPES if any(d in r for r in profile.flops.values())]
    lines = [f"{profile.name}: {profile.source}", f"{'compute':<12}" + "".join(f"{d:>16}" for d in dtypes)]
    for op_class, rates in profile.flops.items():
        cells = "".join(f"{in_flops(rates[d]) + '/s' if d in rates else '-':>16}" for d in dtypes)
        lines.append(f"{op_class:<12}{cells}")
    lines.append(
        f"memory {profile.memory_bandwidth / 1e9:.1f} GB/s, launch {profile.launch * 1e6:.2f} µs per op (program "
        f"line), {profile.memory_bytes / 2**30:.1f} GiB per rank"
    )
    fitted = profile.calibrated and profile.device_type == "cpu"  # fitted on real steps (step_fits.py)
    if fitted:
        pipeline = f", +{profile.pipeline_action * 1e3:.2f} ms per pipeline action" if profile.collectives else ""
        lines.append(
            f"in a step (fitted): ops take x{profile.kernel_scale:.2f} their time alone, "
            f"+{profile.step_overhead * 1e3:.2f} ms per step{pipeline}"
        )
    if profile.collectives:
        bytes_ = f"bytes x{profile.link_scale:.2f} their link time, " if fitted else ""
        bytes_ += f"+{profile.box_overhead * 1e6:.0f} µs per synchronous boxing, " if fitted else ""
        lines.append(
            f"collectives in a step: +{profile.in_step * 1e6:.0f} µs each, {bytes_}{profile.overlap:.0%} of a "
            "started one hidden by compute"
        )
    if profile.collectives:
        lines.append(f"{'collective':<16}{'ranks':>6}{'latency':>12}{'bus bandwidth':>16}")
    for f in profile.collectives:
        lines.append(f"{f.kind:<16}{f.ranks:>6}{f.latency * 1e6:>9.1f} µs{f.bus_bandwidth / 1e9:>11.2f} GB/s")
    return "\n".join(lines)
