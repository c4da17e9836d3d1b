"""A rank's step time from its lowered program, priced on a device profile without running it.

The program is walked in order on two clocks, as the runtime runs it: one compute stream (each op a roofline
of its local FLOPs and bytes, plus the profile's launch floor) and one communication stream (collectives
one at a time in issue order, latency + bus bytes / bus bandwidth). A synchronous boxing waits for both; a
started collective (a gradient bucket, a prefetched ZeRO-3 gather) runs on the communication stream while
compute goes on, and its wait blocks compute only for what is left. The optimizer update of each unit runs
where the plan runs it (``updates``): after backward, or unit by unit as its collective completes. Decision:
one rank, deterministic, in program order — what the IR's schedule says, not a discrete-event simulation of
contention; how far that is from measurement is BENCHMARKS.md's cost-model table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from shardflow.boxing.plan import COLLECTIVES
from shardflow.cost.profile import DeviceProfile
from shardflow.graph.ir.instr import Box, GatherStart, Launch, Op, Release, Wait, Work
from shardflow.graph.ir.step import StepIR

if TYPE_CHECKING:
    from shardflow.graph.parallel_module import ParallelModule
    from shardflow.graph.program import Program

# element-wise kernels, and passes over a parameter-sized tensor, of one single-tensor update (torch's
# implementations: AdamW decays, lerps, addcmuls, takes a root, divides, adds; SGD one add, or three with momentum)
_UPDATE_WORK = {"AdamW": (8, 23), "Adam": (7, 21), "SGD": (1, 3)}


@dataclass(frozen=True)
class StepTime:
    """One rank's predicted step, in seconds: ``total`` and where it goes."""

    total: float
    compute: dict[str, float] = field(default_factory=dict)  # by phase: forward, backward, recompute
    communication: float = 0.0  # every collective's own time
    exposed: float = 0.0  # the part of it compute waited for
    update: float = 0.0  # the optimizer update (and ZeRO's all-gather of updated pieces)
    bubble: float = 0.0  # a pipeline stage's idle time in its schedule

    @property
    def hidden(self) -> float:
        """Communication that ran while compute went on."""
        return max(self.communication - self.exposed, 0.0)

    def explain(self) -> str:
        parts = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in self.compute.items() if v)
        return (
            f"{self.total * 1e3:.2f} ms per step: compute ({parts}), communication {self.communication * 1e3:.2f} ms "
            f"({self.exposed * 1e3:.2f} ms exposed), update {self.update * 1e3:.2f} ms"
            + (f", pipeline bubble {self.bubble * 1e3:.2f} ms" if self.bubble else "")
        )


def op_class(op: str) -> str:
    """The profile's op class of an ATen op name (``"aten.mm"``)."""
    if "attention" in op or "flash" in op:
        return "attention"
    if "convolution" in op:
        return "conv"
    return "matmul"


def op_seconds(work: Work | None, profile: DeviceProfile) -> float:
    """Roofline of one op: its matmul part at its class's rate and its element-wise part at the vector rate,
    or its bytes at the memory bandwidth, whichever is longer, plus the launch floor."""
    if work is None:
        return profile.launch
    compute = 0.0
    if work.flops is not None:
        compute = work.flops.matmul / profile.rate(op_class(work.op), work.dtype)
        compute += (work.flops.vector + work.flops.recompute) / profile.rate("vector", work.dtype)
    return max(compute, work.nbytes / profile.memory_bandwidth) + profile.launch


def boxing_seconds(ins: Box, profile: DeviceProfile) -> float:
    """A layout conversion's communication: each step of its plan priced on the profile's links."""
    comm = ins.comm
    if comm is None:
        return 0.0
    if comm.plan is None:  # a gradient bucket
        return profile.collective(comm.kind, comm.group, comm.nbytes)
    total = 0.0
    for step in comm.plan.steps:
        if step.kind in COLLECTIVES:
            n = step.src_mesh.shape[step.axis]
            if n > 1:
                total += profile.collective(step.kind, n, step.bytes_per_rank / _bus(step.kind, n))
        elif step.kind == "send_recv":
            total += profile.collective("send_recv", 2, step.bytes_per_rank)
        else:
            total += profile.launch
    return total


def _bus(kind: str, n: int) -> float:
    # a plan step records the bytes each rank sends; the profile prices full pieces
    return 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n


@dataclass
class _Clocks:
    compute: float = 0.0
    comm: float = 0.0  # when the communication stream is next free
    busy: float = 0.0  # total communication time
    exposed: float = 0.0

    def blocking(self, seconds: float) -> None:
        """A synchronous collective: it waits for earlier ones, and compute waits for it."""
        start = max(self.compute, self.comm)
        self.exposed += start + seconds - self.compute
        self.compute = self.comm = start + seconds
        self.busy += seconds

    def started(self, seconds: float) -> float:
        """A collective started now, finishing in the background; returns when it finishes."""
        self.comm = max(self.compute, self.comm) + seconds
        self.busy += seconds
        return self.comm

    def wait(self, until: float) -> None:
        if until > self.compute:
            self.exposed += until - self.compute
            self.compute = until


def program_time(
    ir: StepIR, profile: DeviceProfile, start: int = 0, stop: int | None = None
) -> tuple[_Clocks, dict[str, float], dict[int, float], float]:
    """Walk ``ir`` (its instructions ``start:stop``: a stage's forward or backward): the clocks at its end,
    compute seconds by phase, when each update unit's gradients are ready (by unit), and when backward's
    compute ended."""
    clocks, phases = _Clocks(), {"forward": 0.0, "backward": 0.0, "recompute": 0.0}
    handles: dict[str, float] = {}
    unit_ready: dict[int, float] = {}
    backward_end = 0.0
    for i, ins in enumerate(ir.body[start:stop], start):
        if isinstance(ins, Op):
            seconds = op_seconds(ins.work, profile)
            clocks.compute += seconds
            phase = ins.work.phase if ins.work is not None else "forward"
            phases[phase] = phases.get(phase, 0.0) + seconds
        elif isinstance(ins, Launch):
            assert ins.comm is not None
            copy_in = ins.comm.nbytes / max(ins.comm.group, 1) * 2 / profile.memory_bandwidth
            clocks.compute += copy_in + profile.launch
            handles[ins.out] = clocks.started(profile.collective(ins.comm.kind, ins.comm.group, ins.comm.nbytes))
        elif isinstance(ins, GatherStart):
            clocks.compute += profile.launch
            handles[ins.out] = clocks.started(boxing_seconds(ins, profile))
        elif isinstance(ins, Box):
            if ins.src in handles:  # finishing a started gather
                clocks.wait(handles[ins.src])
            elif ins.comm is not None:
                clocks.blocking(boxing_seconds(ins, profile))
            clocks.compute += profile.launch
        elif isinstance(ins, Wait):
            clocks.wait(handles.get(ins.handle, 0.0))
        for release in ir.releases.get(i, []):
            _released(release, handles, clocks, unit_ready)
        if isinstance(ins, Release):
            if ins.unit is None:
                backward_end = clocks.compute
            else:
                _released(ins, handles, clocks, unit_ready)
    return clocks, phases, unit_ready, backward_end or clocks.compute


def _released(release: Release, handles: dict[str, float], clocks: _Clocks, ready: dict[int, float]) -> None:
    if release.unit is not None:
        payload = release.payload[0] if release.bucket and release.payload else ""
        ready[release.unit] = max(handles.get(payload, 0.0), clocks.compute)


def update_seconds(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], profile: DeviceProfile) -> float:
    """One update of ``params``: its kernels' launch floors and its passes over them at memory bandwidth
    (an update is element-wise: memory bound)."""
    if not params:
        return 0.0
    name = type(optimizer).__name__
    kernels, passes = _UPDATE_WORK.get(name, (4, 12))
    if name == "SGD" and any(g.get("momentum", 0) for g in optimizer.param_groups):
        kernels, passes = 3, 8
    groups = optimizer.param_groups
    fused = any(g.get("fused") for g in groups)  # one kernel over every tensor
    # torch picks foreach kernels by default for CUDA tensors only (the estimate's tensors are on meta)
    foreach = fused or any(g.get("foreach") for g in groups)
    foreach |= profile.device_type == "cuda" and all(g.get("foreach") is None for g in groups)
    launches = (1 if fused else kernels) * (1 if foreach else len(params))
    nbytes = sum(p.numel() * p.element_size() for p in params)
    return launches * profile.launch + passes * nbytes / profile.memory_bandwidth


def step_time(pm: ParallelModule, program: Program, profile: DeviceProfile) -> StepTime:
    """``pm``'s step on this rank (``program``, lowered for it): the program's walk, then the updates."""
    assert program.ir is not None
    clocks, phases, ready, backward_end = program_time(program.ir, profile)
    per_unit = [
        update_seconds(pm.optimizer, [pm.local_params[program.grad_of[k]] for k in unit.grads], profile)
        for unit in program.units
    ]
    update = sum(per_unit)
    end = clocks.compute
    if pm.updates in ("after", "inline") or pm.max_grad_norm is not None or not program.units:
        end += update
    else:  # each unit updated once its gradients are reduced, in release order, beside the program
        chain = backward_end if pm.updates == "loop" else 0.0  # the loop shares the compute thread
        for u, seconds in enumerate(per_unit):
            chain = max(chain, ready.get(u, backward_end)) + seconds
        end = max(end, chain)
    gathers = 0.0
    for i, (p, sl) in enumerate(zip(pm.params, pm.slices)):  # ZeRO-1/2: the updated pieces all-gathered
        if sl is not None:
            n = math.prod(pm.mesh.shape[a] for a, (h, o) in enumerate(zip(p.sbp, pm.opt_sbps[i])) if h != o)
            gathers += profile.collective("all_gather", n, p._local.numel() * p._local.element_size())
    comm = clocks.busy + gathers
    return StepTime(end + gathers, phases, comm, clocks.exposed + gathers, update + gathers)
