"""Throughput of a run: samples or tokens per second, FLOP/s and MFU, from a step's counted FLOPs.

MFU (model FLOPs utilisation, as PaLM defines it) is the step's model FLOPs per second over the peak of
every device of the job, with the model FLOPs as shardflow counts them (``Flops.total``: each logical op
once, no recomputation, element-wise work included by ``ops/flops/``' convention: about 1% of a GPT-2-sized
transformer's step, up to half of a small MLP's, where PaLM's and Megatron's formulas count matmuls only;
``Flops.matmul_total`` is that part). ``hfu`` is this rank's own work (replicated and recomputed work
included) over its device's peak. Peaks come from a table of datasheet figures (dense, no sparsity) for
GPUs, and on a CPU from a matmul probe, measured once per machine, thread count and dtype and cached in a
JSON file: a CPU has no datasheet figure a run could reach.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from shardflow.ops.flop_count import Flops, in_flops

# dense datasheet peaks of one device, FLOP/s: (bf16 and fp16, tf32, fp32 without tensor cores), the first
# key found in the device's name wins (NVL and PCIe boards before the SXM ones sharing their names)
DEVICE_PEAKS: dict[str, tuple[float, float, float]] = {
    "H200 NVL": (835.5e12, 417.5e12, 60.0e12),
    "H100 NVL": (835.5e12, 417.5e12, 60.0e12),
    "H100 PCIe": (756.5e12, 378.0e12, 51.2e12),
    "H200": (989.4e12, 494.7e12, 66.9e12),  # H200 SXM (GH200 too)
    "H100": (989.4e12, 494.7e12, 66.9e12),  # H100 SXM
    "A100": (312.0e12, 156.0e12, 19.5e12),
}


@dataclass(frozen=True)
class Peak:
    """One device's peak FLOP/s for a dtype, and where the figure comes from."""

    flops_per_s: float
    source: str


def device_peak(
    device: torch.device | str, dtype: torch.dtype = torch.float32, conv_share: float = 0.0, cache: Path | None = None
) -> Peak:
    """The peak of one ``device`` computing in ``dtype``. A GPU in the table: its datasheet figure; in float32,
    tf32's for matmuls where ``torch.set_float32_matmul_precision("high")`` allows it and for convolutions
    where ``torch.backends.cudnn.allow_tf32`` does (torch's default), blended by the share of the work that
    is convolutions (``conv_share``: the step takes each part's work over its own peak). Another GPU, or a
    CPU: a matmul probe (``probe``), a CPU's measured once per CPU, thread count and dtype and kept in
    ``cache`` (default ``~/.cache/shardflow/peaks.json``)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = next((peaks for key, peaks in DEVICE_PEAKS.items() if key in name), None)
        if found is None or "MIG" in name:  # a MIG slice has part of the chip's peak
            return Peak(probe(device, dtype), f"{name}: no datasheet figure in the table, a matmul probe on it")
        half, tf32, fp32 = found
        if dtype in (torch.bfloat16, torch.float16):
            return Peak(half, f"{name} datasheet, {dtype} dense")
        matmul_tf32 = _allows_tf32(
            getattr(torch.backends.cuda, "matmul", None), lambda: torch.get_float32_matmul_precision() != "highest"
        )
        conv_tf32 = _allows_tf32(
            getattr(torch.backends.cudnn, "conv", None), lambda: bool(torch.backends.cudnn.allow_tf32)
        )
        matmuls = tf32 if matmul_tf32 else fp32
        convolutions = tf32 if conv_tf32 else fp32
        blended = 1 / (conv_share / convolutions + (1 - conv_share) / matmuls)
        kinds = f"matmuls {'tf32' if matmuls == tf32 else 'fp32'}"
        if conv_share:
            kinds += f", convolutions ({conv_share:.0%} of the work) {'tf32' if convolutions == tf32 else 'fp32'}"
        return Peak(blended, f"{name} datasheet, {kinds}")
    if cache is None:
        try:
            cache = Path.home() / ".cache" / "shardflow" / "peaks.json"
        except RuntimeError:  # no home directory: nowhere to keep it
            return Peak(probe(device, dtype), f"a {dtype} matmul probe on this CPU, not cached (no home directory)")
    return _cached_probe(device, dtype, cache)


def _allows_tf32(backend: Any, older: Callable[[], bool]) -> bool:
    """Whether float32 work of ``backend`` (``torch.backends.cuda.matmul``, ``torch.backends.cudnn.conv``) may
    run in tf32: torch's newer ``fp32_precision`` where it is set, else the ``older`` setting (whose getter
    raises once the newer one is set)."""
    newer = getattr(backend, "fp32_precision", "none")
    if newer in ("tf32", "ieee"):
        return bool(newer == "tf32")
    try:
        return older()
    except RuntimeError:
        return False


def _cached_probe(device: torch.device, dtype: torch.dtype, path: Path) -> Peak:
    """A CPU's probe from the cache, or measured and added to it. Processes on one machine take turns (a
    lock file): the first probes while the others wait, so no probe runs beside another on shared cores."""
    key = f"{_cpu_name()}|threads={torch.get_num_threads()}|{dtype}"
    threads = torch.get_num_threads()
    source = f"a {dtype} matmul probe on this CPU ({threads} thread{'s' if threads != 1 else ''}), cached in {path}"
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = open(path.with_name(path.name + ".lock"), "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError:  # a read-only cache (or no locks on its file system): read it, else probe every time
        known = _read(path)
        if key in known:
            return Peak(known[key], source)
        return Peak(probe(device, dtype), source.replace("cached in", "not cached: cannot write"))
    with lock:
        known = _read(path)
        if key not in known:
            known[key] = probe(device, dtype)
            _write(path, known)
    return Peak(known[key], source)


def probe(device: torch.device | str, dtype: torch.dtype = torch.float32, seconds: float = 0.3) -> float:
    """FLOP/s of the best of repeated matmuls on ``device`` for about ``seconds``: one ``512 x 512`` at a
    time on a CPU, eight ``4096 x 4096`` between synchronisations on a GPU (launch costs not in the figure)."""
    device = torch.device(device)
    n, reps = (4096, 8) if device.type == "cuda" else (512, 1)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    torch.mm(a, b)  # warm-up
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or best == float("inf"):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best


@contextlib.contextmanager
def rank_threads(threads: int) -> Iterator[None]:
    """With ``threads`` intra-op threads (a rank's share of the cores; 0: as they are), restored after: how a
    measurement times what one rank of a job would."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _read(path: Path) -> dict[str, float]:
    """The cached peaks; entries that are not a positive finite number are dropped (probed again)."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(found, dict):
        return {}
    good = {k: v for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: float(v) for k, v in good.items() if 0 < v < math.inf}


def _write(path: Path, peaks: dict[str, float]) -> None:
    """Whole or not at all: a file of its own in the same folder, then moved into place."""
    with contextlib.suppress(OSError):
        fd, partial = tempfile.mkstemp(prefix=path.name, suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(peaks, f, indent=1)
            os.chmod(partial, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
            os.replace(partial, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(partial)


class Throughput(NamedTuple):
    """What a measured step (or steps) achieved."""

    seconds: float
    samples_per_s: float | None
    tokens_per_s: float | None
    flops_per_s: float  # model FLOPs of the job per second
    mfu: float  # flops_per_s over every device's peak
    hfu: float  # this rank's work (replicated and recomputed included) per second over its device's peak

    def __str__(self) -> str:
        parts = []
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s")
        elif self.samples_per_s is not None:
            parts.append(f"{self.samples_per_s:,.0f} samples/s")
        parts.append(f"{in_flops(self.flops_per_s)}/s, MFU {self.mfu:.1%}")
        return ", ".join(parts)


class Meter:
    """Samples or tokens per second, FLOP/s and MFU of steps whose FLOPs are ``flops``, on ``devices``
    devices each of ``peak``. ``Meter.of(pm)`` reads all three from a compiled model::

        meter = sf.Meter.of(pm)
        with meter.timing() as timed:
            pm.step(x, y)
        print(meter.measure(timed.seconds, samples=len(x)))   # "... samples/s, 1.2 GFLOP/s, MFU 3.4%"
    """

    def __init__(self, flops: Flops, devices: int, peak: Peak) -> None:
        if devices < 1 or peak.flops_per_s <= 0:
            raise ValueError(f"a meter needs at least one device and a positive peak (got {devices}, {peak})")
        self.flops, self.devices, self.peak = flops, devices, peak

    @classmethod
    def of(cls, pm: Any, *inputs: Any, peak: float | None = None, dtype: torch.dtype | None = None) -> Meter:
        """A meter of ``pm``'s steps on ``inputs`` (default: its example inputs) over its mesh's devices;
        ``peak`` (FLOP/s of one device) overrides ``device_peak``'s; ``dtype`` (default: the parameters')
        picks the table's column."""
        flops = pm.flops(*inputs)
        if dtype is None:
            dtype = next((p.dtype for p in pm.params if p.dtype.is_floating_point), torch.float32)
        convolutions = sum(n for op, n in flops.matmul.items() if "convolution" in op)
        share = convolutions / flops.total if flops.total else 0.0
        found = Peak(peak, "given") if peak else device_peak(pm.mesh.device, dtype, conv_share=share)
        return cls(flops, pm.mesh.size, found)

    @contextlib.contextmanager
    def timing(self) -> Iterator[_Timed]:
        """Time the block (waiting for the device's queued work at both ends)."""
        timed = _Timed()
        device = torch.device("cuda") if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        if device is not None:
            _sync(device)
        start = time.perf_counter()
        yield timed
        if device is not None:
            _sync(device)
        timed.seconds = time.perf_counter() - start

    def measure(
        self, seconds: float, steps: int = 1, samples: int | None = None, tokens: int | None = None
    ) -> Throughput:
        """What ``steps`` steps in ``seconds`` achieved; ``samples`` and ``tokens`` are per step."""
        if seconds <= 0:
            raise ValueError(f"seconds must be positive, got {seconds}")
        flops = self.flops.total * steps / seconds
        mine = self.flops.rank
        hfu = (mine.total + mine.recompute) * steps / seconds / self.peak.flops_per_s if mine is not None else 0.0
        return Throughput(
            seconds,
            samples * steps / seconds if samples is not None else None,
            tokens * steps / seconds if tokens is not None else None,
            flops,
            flops / (self.devices * self.peak.flops_per_s),
            hfu,
        )


@dataclass
class _Timed:
    seconds: float = 0.0
