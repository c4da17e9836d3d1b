"""``shardflow plan CONFIG --simulate N1,N2,...``: the config's job priced at other device counts, in one process.

Decision: grow the job as users do (every mesh axis but the data-parallel one keeps its size, that one takes the
rest, and the global batch grows with it unless ``fixed_batch``) and price each plan with the estimator
(graph/estimate.py) on a virtual mesh of a meta-device model: 1,024 devices cost one traced step and one lowering
per distinct rank program, never a process group or a byte of weights.
"""

from __future__ import annotations

import math
import os
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from shardflow.cost.profile import device_profile
from shardflow.graph.estimate import Estimate, Estimator
from shardflow.graph.strategy import axes_for
from shardflow.plan import MeshSpec
from shardflow.runtime.memory import fmt_bytes
from shardflow.train.config import TrainConfig
from shardflow.train.data import make_batches, sequence_length
from shardflow.train.loop import config_plan, optimizer_of
from shardflow.train.models import TrainModel, build_model

PIPELINE_AXIS = "pp"  # the axis name that makes config_plan pipeline the model
# devices, mesh, global batch, step, peak per rank, throughput, MFU, traces, lowerings
_WIDTHS = (7, 18, 12, 10, 13, 10, 9, 7, 10)


@dataclass(frozen=True)
class Row:
    """One device count, priced."""

    devices: int
    mesh: MeshSpec
    batch: int  # the global batch, in samples
    step_seconds: float
    peak_bytes: int  # the fullest rank's
    throughput: float  # tokens (or samples, see Simulation.unit) per second
    mfu: float
    traces: int  # steps traced to price this row (graph/estimate.py's Estimator.traces)
    lowerings: int  # rank programs lowered for it: one per distinct rank program
    seconds: float  # wall time spent planning and pricing it
    estimate: Estimate = field(repr=False)  # the whole of it: per rank class, compute, communication, update

    @property
    def layout(self) -> str:
        return " x ".join(f"{n}={s}" for n, s in zip(self.mesh.names, self.mesh.shape))


class Simulation:
    """The config's job at each of ``counts`` devices on ``device``'s profile (a name, a JSON path, or None: this
    machine's calibrated one). Building it checks every count and the profile, fast; ``rows()`` prices them."""

    def __init__(
        self, cfg: TrainConfig, counts: Sequence[int], device: str | None = None, fixed_batch: bool = False
    ) -> None:
        if cfg.plan or cfg.save:
            raise ValueError(
                "--simulate builds a plan per device count from the config's mesh and strategy keys; "
                "it takes neither --plan nor --save"
            )
        if not counts:
            raise ValueError("--simulate needs at least one device count")
        if cfg.embeddings.tables:
            raise ValueError(
                "--simulate prices dense plans; sparse tables ([embeddings], the built-in DLRM) are not priced yet: "
                "shardflow plan CONFIG (no --simulate) prints their placement, bytes per rank and all-to-all traffic"
            )
        self.cfg, self.fixed_batch = cfg, fixed_batch
        self.profile = device_profile(device)  # before any work: an unknown name is the first error
        self.dp = data_axis(cfg)
        self.meshes = [scaled_mesh(cfg, n, self.dp, self.profile.device_type) for n in sorted(set(counts))]
        self.batches = [scaled_batch(cfg, m, self.dp, fixed_batch) for m in self.meshes]
        self._model: TrainModel | None = None
        self._example: tuple[Any, ...] = ()

    @property
    def unit(self) -> str:
        """What the throughput counts: tokens where the first input is token ids (batch, seq), else samples."""
        self._build()
        return "tokens" if sequence_length(self._example) else "samples"

    @property
    def title(self) -> str:
        model = self._build()
        cfg = self.cfg.model
        name = cfg.builtin or cfg.hf or cfg.function
        args = ", ".join(f"{k}={v}" for k, v in cfg.args.items() if isinstance(v, (int, float, str)))
        params = sum(p.numel() for p in model.module.parameters())
        zero = f", ZeRO-{self.cfg.zero}" if self.cfg.zero else ""
        return f"{name} ({args}{', ' if args else ''}{_si(params)} parameters), strategy {self.cfg.strategy}{zero}"

    @property
    def batching(self) -> str:
        """How the global batch follows the device count."""
        if self.fixed_batch:
            return f"global batch {self.cfg.batch_size} at every count"
        axis, ranks = self.cfg.axes[self.dp], self.cfg.mesh[self.dp]
        return f"global batch grows with {axis} ({self.cfg.batch_size} per {ranks} {axis} ranks)"

    def _build(self) -> TrainModel:
        if self._model is None:
            with torch.device("meta"):  # shapes only: a model of any size costs no memory
                self._model = build_model(self.cfg.model, self.cfg.seed)
            # one real batch at the config's size; each count's inputs are meta tensors of its global batch
            self._example = next(
                make_batches(self.cfg.data, self.cfg.batch_size, self.cfg.seed, self._model.context).train(0)
            )
        return self._model

    def rows(self) -> Iterator[Row]:
        """Each count priced, smallest first."""
        model = self._build()
        seq = sequence_length(self._example) or 1
        estimators: dict[int, Estimator] = {}  # by global batch: a traced step depends on the inputs' shapes only
        for mesh, batch in zip(self.meshes, self.batches):
            started = time.perf_counter()
            inputs = tuple(_resized(x, batch) for x in self._example)
            if batch not in estimators:
                estimators[batch] = Estimator(model.module, inputs, optimizer_of(self.cfg), self.profile)
            est = estimators[batch]
            traces, lowerings = est.traces, est.lowerings
            plan = config_plan(self.cfg, model.module, mesh, inputs)
            try:
                e = est(plan)
            except NotImplementedError as err:  # a plan the cost model cannot price (stages of unequal meshes)
                raise ValueError(f"{mesh.size} devices: {err}") from None
            yield Row(
                mesh.size, mesh, batch, e.step_seconds, max(e.peak_bytes), batch * seq / e.step_seconds, e.mfu,
                est.traces - traces, est.lowerings - lowerings, time.perf_counter() - started, e,
            )  # fmt: skip

    def header(self) -> str:
        p = self.profile
        kind = "calibrated" if p.calibrated else "datasheet"
        cells = ("devices", "mesh", "global batch", "step (ms)", "peak/rank  ", f"{self.unit}/s", "MFU")
        columns = "".join(_cell(c, i) for i, c in enumerate((*cells, "traces", "lowerings")))
        memory = fmt_bytes(p.memory_bytes)
        return f"{self.title} on {p.name} ({kind} profile, {memory} per device), {self.batching}\n{columns}"

    def line(self, row: Row) -> str:
        over = row.peak_bytes > self.profile.memory_bytes
        cells = (
            row.devices, row.layout, row.batch, f"{row.step_seconds * 1e3:.2f}",
            fmt_bytes(row.peak_bytes) + (" !" if over else "  "), _si(row.throughput), _percent(row.mfu),
            row.traces, row.lowerings,
        )  # fmt: skip
        return "".join(_cell(c, i) for i, c in enumerate(cells))

    def footer(self, rows: Sequence[Row]) -> str:
        lines = [
            f"priced {len(rows)} device count(s) in {sum(r.seconds for r in rows):.1f} s: "
            f"{sum(r.traces for r in rows)} trace(s), {sum(r.lowerings for r in rows)} lowering(s)"
        ]
        if any(r.peak_bytes > self.profile.memory_bytes for r in rows):
            lines.append(f"! over the {self.profile.name}'s {fmt_bytes(self.profile.memory_bytes)} of memory")
        return "\n".join(lines)


def data_axis(cfg: TrainConfig) -> int:
    """The config's data-parallel axis (as the strategy reads the mesh), the one that grows."""
    spec = MeshSpec("cpu", tuple(cfg.mesh), tuple(cfg.axes), tuple(range(math.prod(cfg.mesh))))
    dp, _ = axes_for(spec, cfg.strategy, PIPELINE_AXIS if PIPELINE_AXIS in cfg.axes else None)
    if dp is None:
        raise ValueError(
            f"--simulate grows the data-parallel axis; strategy {cfg.strategy!r} on axes {cfg.axes} has none "
            "(use strategy 'dp', or 'hybrid' with a 'dp' axis)"
        )
    return dp


def scaled_mesh(cfg: TrainConfig, devices: int, dp: int, device_type: str) -> MeshSpec:
    """The config's mesh on ``devices``: every axis but ``dp`` at its configured size, ``dp`` the rest."""
    kept = [(n, s) for i, (n, s) in enumerate(zip(cfg.axes, cfg.mesh)) if i != dp]
    others = math.prod(s for _, s in kept)
    if devices % others:
        sizes = " x ".join(f"{n}={s}" for n, s in kept)
        raise ValueError(
            f"--simulate {devices}: the config's axes {cfg.axes} keep {sizes} at every size and grow {cfg.axes[dp]!r}, "
            f"so a device count must be a multiple of {others}"
        )
    shape = list(cfg.mesh)
    shape[dp] = devices // others
    return MeshSpec(device_type, tuple(shape), tuple(cfg.axes), tuple(range(devices)))


def scaled_batch(cfg: TrainConfig, mesh: MeshSpec, dp: int, fixed: bool) -> int:
    """The global batch on ``mesh``: the config's per data-parallel rank (weak scaling), or its own (``fixed``)."""
    if fixed:
        return cfg.batch_size
    grown = cfg.batch_size * mesh.shape[dp]
    if grown % cfg.mesh[dp]:
        raise ValueError(
            f"--simulate {mesh.size}: batch_size {cfg.batch_size} over {cfg.mesh[dp]} data-parallel ranks is not a "
            f"whole number of samples per rank to grow to {mesh.shape[dp]} ranks; use --fixed-batch or a batch_size "
            f"divisible by {cfg.mesh[dp]}"
        )
    return grown // cfg.mesh[dp]


def plot(sim: Simulation, rows: Sequence[Row], path: str) -> None:
    """Throughput against devices (log-log: linear scaling is a straight line) beside linear scaling from the
    smallest count, and MFU on a second axis; written whole to ``path`` (a temporary file, then renamed)."""
    # a Figure of its own, not pyplot: no global backend switched, nothing left open in the caller's process
    from matplotlib.figure import Figure

    n = [r.devices for r in rows]
    fig = Figure(figsize=(8, 4.8))
    ax = fig.add_subplot()
    ax.plot(n, [r.throughput for r in rows], "o-", color="tab:blue", label=f"predicted {sim.unit}/s")
    first = rows[0]
    ideal = [first.throughput * d / first.devices for d in n]
    ax.plot(n, ideal, "--", color="grey", label=f"linear scaling from {first.devices}")
    over = [r for r in rows if r.peak_bytes > sim.profile.memory_bytes]
    if over:
        ax.plot([r.devices for r in over], [r.throughput for r in over], "x", color="red", ms=12, label="over memory")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(n, [str(d) for d in n])
    ax.set_xlabel("devices")
    ax.set_ylabel(f"{sim.unit}/s")
    mfu = ax.twinx()
    mfu.plot(n, [100 * r.mfu for r in rows], "s:", color="tab:red", label="MFU")
    mfu.set_ylabel("MFU (%)")
    mfu.set_ylim(bottom=0, top=max(1.2 * max(100 * r.mfu for r in rows), 1e-3))
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = mfu.get_legend_handles_labels()
    # below the axes: the curves cross the whole plot, a legend inside would hide one
    fig.legend(lines + more, labels + more_labels, loc="lower center", ncol=len(labels) + 1, fontsize="small")
    ax.grid(True, which="major", alpha=0.3)
    kind = "calibrated" if sim.profile.calibrated else "datasheet"
    title = textwrap.fill(sim.title, 90)  # a Hugging Face model's arguments run long: wrapped, not cut off
    ax.set_title(f"{title}\non {sim.profile.name} ({kind} profile), {sim.batching}", fontsize="medium")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".simulate", suffix=".png.partial")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
        os.chmod(tmp, 0o644)  # mkstemp's file is the owner's alone; a plot is for anyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _resized(x: Any, batch: int) -> Any:
    """An input with ``batch`` samples (dim 0) as a meta tensor: its shape without its memory."""
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return torch.empty((batch, *x.shape[1:]), dtype=x.dtype, device="meta")
    return x


def _cell(value: object, column: int) -> str:
    width = _WIDTHS[column]
    return f"  {value!s:<{width}}" if column == 1 else f" {value!s:>{width}}"


def _percent(x: float) -> str:
    """34.1%, 31.0%; a small model's 0.0191% keeps three digits rather than reading 0.0%."""
    return f"{100 * x:.1f}%" if x >= 0.01 else f"{100 * x:.3g}%"


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"
