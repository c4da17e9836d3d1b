"""Device profiles: what one device computes per second, per op class, and what its links move.

A profile is data, one JSON file: datasheet profiles ship with the package (``profiles/*.json``: H100,
H200, A100, labelled as not calibrated here), and ``shardflow calibrate`` measures this machine's and keeps
it under ``~/.cache/shardflow/profiles/``. Compute is a roofline per op class (matmul, convolution,
attention, element-wise FLOP/s by dtype, memory bytes/s) with a launch floor per op; a collective is
``latency + bus factor x bytes / bus bandwidth`` (nccl-tests' convention), fitted per kind and group size,
plus what a collective costs inside a real step beyond that (fitted on compiled steps).
Decision: the same file format for shipped and measured profiles, so a lent GPU's calibration replaces a
datasheet's by name, and the cost model never asks where a number came from.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_SHIPPED = Path(__file__).parent / "profiles"
# the model a calibrated CPU profile's fitted figures belong to: 4 fits the launch floor beyond ops timed here
# (``graph/kernel_time.py``), their in-step scale, and the in-step costs of collectives and synchronous boxings
# on the job's ranks; a CPU profile fitted for another model is measured again
FORMAT = 4
OP_CLASSES = ("matmul", "conv", "attention", "vector")
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


class ProfileError(ValueError):
    """A device profile that cannot be found or read."""


@dataclass(frozen=True)
class LinkFit:
    """One collective ``kind`` on groups of ``ranks``: seconds = ``latency`` + bus bytes / ``bus_bandwidth``."""

    kind: str
    ranks: int
    latency: float
    bus_bandwidth: float  # bytes/s of bus traffic (nccl-tests' "busbw")


def bus_factor(kind: str, n: int) -> float:
    """The bytes each rank sends per byte of the full piece, for ring algorithms on ``n`` ranks
    (nccl-tests' bus-bandwidth factors): all-reduce 2(n-1)/n; gathers, scatters, all-to-all (n-1)/n."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n if kind == "all_reduce" else 1.0 if kind == "send_recv" else (n - 1) / n


@dataclass(frozen=True)
class DeviceProfile:
    """One device of a job and its links (see the module docstring). FLOP/s maps are keyed by dtype name
    (``"float32"``, ``"bfloat16"``, ``"float16"``); ``node_size`` devices share the fast links
    (``collectives``), larger groups cross the ``network``."""

    name: str
    device_type: str  # "cpu" or "cuda"
    source: str  # how the numbers were obtained
    calibrated: bool  # measured on this kind of machine (False: datasheet figures)
    flops: Mapping[str, Mapping[str, float]]  # op class -> dtype -> FLOP/s
    memory_bandwidth: float  # bytes/s an element-wise op streams
    launch: float  # seconds per op, whatever its size (Python, dispatch, kernel launch)
    memory_bytes: int  # device memory per rank
    collectives: tuple[LinkFit, ...] = ()
    node_size: int = 1
    network: tuple[LinkFit, ...] = ()  # fits for groups wider than a node
    threads: int = 0  # CPU: the intra-op threads the compute was measured with (0: not a CPU)
    peaks: Mapping[str, float] = field(default_factory=dict)  # datasheet dense peak by dtype, for MFU
    # what a collective costs inside a step beyond its link fit (the runtime's packing and handles, the
    # waiting rank's wake-up; fitted by calibrate on real steps with ``link_scale``), and the share of a
    # started one that runs beside compute (on a CPU whose cores all compute, gloo's copies and sums take
    # the compute's cores; from calibrate's microbenchmark)
    in_step: float = 0.0
    overlap: float = 1.0
    # a collective's bytes inside a step take this many times their link-fit time (gloo's threads share the
    # cores the step computes on; link fits are timed between idle ranks)
    link_scale: float = 1.0
    # seconds a synchronous boxing inside the program (tensor parallelism's all-reduces, BatchNorm's statistics,
    # the loss's, ZeRO-3's gathers not prefetched) costs the compute clock beyond its collective: the boxing
    # runtime's Python, and the partner rank that reaches it late. Not charged: started buckets and gathers,
    # and the all-gathers after a ZeRO-1/2 update, which run back to back once the ranks are in step
    box_overhead: float = 0.0
    step_overhead: float = 0.0  # seconds per step the runtime spends beyond its program (fitted with ``launch``)
    # an op's seconds inside a real step over its seconds alone (timed in a tight loop, or its roofline): a
    # step's ops find caches full of other ops' tensors; fitted with ``launch`` (1: a datasheet's)
    kernel_scale: float = 1.0
    pipeline_action: float = 0.0  # seconds a pipeline action (a micro-batch's forward or backward) costs beyond it
    ranks: int = 0  # the local ranks of the job its in-step figures were fitted for (0: none fitted)
    format: int = FORMAT
    notes: tuple[str, ...] = field(default_factory=tuple)

    def rate(self, op_class: str, dtype: str) -> float:
        """FLOP/s of ``op_class`` in ``dtype`` (falling back to float32's, then to matmul's)."""
        table = self.flops.get(op_class) or self.flops["matmul"]
        return table.get(dtype) or table.get("float32") or next(iter(table.values()))

    def peak(self, dtype: str) -> float:
        """One device's peak FLOP/s in ``dtype`` for MFU: the datasheet's, or (a CPU) the measured matmul rate."""
        return self.peaks.get(dtype) or self.rate("matmul", dtype)

    def collective(self, kind: str, n: int, nbytes: float, ranks: Sequence[int] = ()) -> float:
        """Seconds for ``kind`` over ``n`` ranks, ``nbytes`` the full piece (gathered output, scattered
        input, all-reduced buffer, a rank's all-to-all input). A group spanning nodes (by its ``ranks``,
        numbered node by node; without them, by its size) uses the ``network`` fits."""
        if n <= 1:
            return 0.0
        nodes = {r // max(self.node_size, 1) for r in ranks} if ranks else None
        crosses = len(nodes) > 1 if nodes is not None else n > self.node_size
        fits = self.network if crosses and self.network else self.collectives
        fit = _nearest([f for f in fits if f.kind == kind] or [f for f in fits if f.kind == "all_gather"] or fits, n)
        # latency grows with the algorithm's steps beyond the fitted group (never below the fit: its launch
        # and setup do not shrink with fewer ranks)
        latency = fit.latency * max(1.0, _steps(kind, n) / _steps(kind, fit.ranks))
        return latency + self.in_step + bus_factor(kind, n) * nbytes / fit.bus_bandwidth * self.link_scale

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "profile") -> DeviceProfile:
        try:
            raw: dict[str, Any] = json.loads(text)
            raw["collectives"] = tuple(LinkFit(**f) for f in raw.get("collectives", ()))
            raw["network"] = tuple(LinkFit(**f) for f in raw.get("network", ()))
            raw["notes"] = tuple(raw.get("notes", ()))
            raw["format"] = int(raw.get("format", 1))
            profile = cls(**raw)
        except (TypeError, ValueError, KeyError) as e:
            raise ProfileError(f"{where} is not a device profile ({e}); re-run `shardflow calibrate`") from None
        if profile.calibrated and profile.device_type == "cpu" and profile.format != FORMAT:
            raise ProfileError(
                f"{where} was calibrated by another version of shardflow, for a cost model whose fitted figures "
                "mean other things; re-run `shardflow calibrate` (about a minute)"
            )
        if "matmul" not in profile.flops or not profile.collectives and profile.node_size > 1:
            raise ProfileError(f"{where}: a profile needs matmul FLOP/s and, above one device, collective fits")
        return profile


def _steps(kind: str, n: int) -> float:
    """Latency-bound steps of ``kind`` on ``n`` ranks: a ring's n-1 (twice for an all-reduce), or for an
    all-reduce a tree's 2 log2 n where that is fewer (NCCL's choice for small messages on wide groups)."""
    if kind == "send_recv" or n <= 1:
        return 1.0
    return min(2.0 * (n - 1), 2.0 * math.log2(n)) if kind == "all_reduce" else float(n - 1)


def _nearest(fits: Sequence[LinkFit], n: int) -> LinkFit:
    if not fits:
        raise ProfileError("the profile has no collective fits; re-run `shardflow calibrate`")
    below = [f for f in fits if f.ranks <= n]
    return max(below, key=lambda f: f.ranks) if below else min(fits, key=lambda f: f.ranks)


def cache_dir() -> Path:
    """Where calibrated profiles are kept (``SHARDFLOW_CACHE`` or ``~/.cache/shardflow``)."""
    return Path(os.environ.get("SHARDFLOW_CACHE") or Path.home() / ".cache" / "shardflow") / "profiles"


def machine_name() -> str:
    """This machine's profile name: host and CPU, so a copied cache directory is not trusted elsewhere."""
    cpu = (platform.processor() or platform.machine()).replace(" ", "_")[:40]
    return f"{socket.gethostname()}-{cpu}"


def shipped() -> list[str]:
    """The datasheet profiles shipped with shardflow, by name."""
    return sorted(p.stem for p in _SHIPPED.glob("*.json"))


def datasheet(name: str) -> DeviceProfile | None:
    """The shipped datasheet profile ``name`` (``"h100"``), or None."""
    path = _SHIPPED / f"{name.lower()}.json"
    return DeviceProfile.from_json(path.read_text(), str(path)) if path.exists() else None


def device_profile(device: str | DeviceProfile | None = None) -> DeviceProfile:
    """A profile by name: ``None`` this machine's calibrated one (``shardflow calibrate`` makes it), a
    shipped name (``"h100"``, ``"h200"``, ``"a100"``; a calibrated profile of that name, if any, wins), or
    a path to a profile's JSON file."""
    if isinstance(device, DeviceProfile):
        return device
    if device is None:
        path = cache_dir() / f"{machine_name()}.json"
        if not path.exists():
            raise ProfileError(
                "this machine has no calibrated device profile yet: run `shardflow calibrate` (about a minute), "
                f"or name one: device='h100' (shipped: {', '.join(shipped())}) or a profile's JSON path"
            )
        return DeviceProfile.from_json(path.read_text(), str(path))
    key = device.lower()
    for path in (cache_dir() / f"{key}.json", _SHIPPED / f"{key}.json"):
        if path.exists():
            return DeviceProfile.from_json(path.read_text(), str(path))
    if os.path.exists(device):
        return DeviceProfile.from_json(Path(device).read_text(), device)
    raise ProfileError(
        f"no device profile {device!r}: shipped ones are {', '.join(shipped())}; or give a profile's JSON path, "
        "or None for this machine's (`shardflow calibrate`)"
    )


def save(profile: DeviceProfile, path: Path | None = None) -> Path:
    """Write ``profile`` (default: as this machine's), whole or not at all."""
    path = path or cache_dir() / f"{machine_name()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(profile.to_json())
    os.replace(tmp, path)
    return path
