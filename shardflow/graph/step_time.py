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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from shardflow.boxing.plan import COLLECTIVES, Plan
from shardflow.comm.init import world
from shardflow.cost.profile import DeviceProfile, bus_factor
from shardflow.graph.ir.instr import Box, Comm, GatherStart, Launch, Op, Release, Wait, Work
from shardflow.graph.ir.step import StepIR
from shardflow.graph.kernel_time import kernel_seconds, timed_here, update_seconds_here

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
    runtime: float = 0.0  # the runtime's own work per step beyond the program's lines (the profile's)
    boxing: float = 0.0  # synchronous boxings' cost on the compute clock (a pipeline stage's: inside compute)

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
            + (f", runtime {self.runtime * 1e3:.2f} ms" if self.runtime else "")
            + (f", synchronous boxings {self.boxing * 1e3:.2f} ms" if self.boxing else "")
        )


def op_class(op: str) -> str:
    """The profile's op class of an ATen op name (``"aten.mm"``)."""
    if "attention" in op or "flash" in op:
        return "attention"
    if "convolution" in op:
        return "conv"
    return "matmul"


def op_seconds(work: Work | None, profile: DeviceProfile) -> float:
    """One op's seconds: timed on this machine where the profile is its own (``graph/kernel_time.py``),
    else the roofline of its matrix work (a fused attention backward's recomputed scores included) at its
    class's rate and its element-wise part at the vector rate, or its bytes at the memory bandwidth,
    whichever is longer; either scaled by the profile's ``kernel_scale`` (inside a step against alone); plus
    the launch floor on a CPU, where the calling thread runs the op, or at least the launch on a GPU, where
    launching overlaps the kernels queued before."""
    if work is None:
        return profile.launch
    compute = 0.0
    if work.flops is not None:
        compute = (work.flops.matmul + work.flops.recompute) / profile.rate(op_class(work.op), work.dtype)
        compute += work.flops.vector / profile.rate("vector", work.dtype)
    roofline = max(compute, work.nbytes / profile.memory_bandwidth)
    if work.call is not None and work.kernels == 1 and timed_here(profile, roofline, work.nbytes):
        measured = kernel_seconds(work.call, profile)
        if measured is not None:
            return measured * profile.kernel_scale + profile.launch
    launches = work.kernels * profile.launch
    roofline *= profile.kernel_scale
    return max(roofline, launches) if profile.device_type == "cuda" else roofline + launches


class Leg(NamedTuple):
    """One collective of a communication: the group it runs on (its ranks) and its seconds."""

    group: tuple[int, ...]
    seconds: float


def legs(comm: Comm | None, rank: int, profile: DeviceProfile) -> list[Leg]:
    """A communication's collectives on this ``rank``, each priced on the profile's links for its group
    (a gradient bucket's one collective, or each step of a boxing plan)."""
    if comm is None:
        return []
    if comm.plan is None:  # a gradient bucket
        return [Leg(comm.ranks, profile.collective(comm.route, len(comm.ranks), comm.nbytes, comm.ranks))]
    return plan_legs(comm.plan, rank, profile)


def plan_legs(plan: Plan, rank: int, profile: DeviceProfile) -> list[Leg]:
    """A boxing plan's steps on this ``rank``, each a collective on its group or a local copy."""
    out = []
    for step in plan.steps:
        n = step.src_mesh.shape[step.axis]
        if step.kind in COLLECTIVES and n > 1:
            group = step.src_mesh.axis_slice(step.axis, rank) if rank in step.src_mesh else ()
            # a plan step records the bytes each rank sends; the profile prices full pieces
            full = step.bytes_per_rank / bus_factor(step.kind, n)
            out.append(Leg(group, profile.collective(step.kind, n, full, group)))
        elif step.kind == "send_recv":
            pair = (step.src_mesh.ranks[0], step.dst_mesh.ranks[0])
            out.append(Leg(pair, profile.collective("send_recv", 2, step.bytes_per_rank, pair)))
        elif step.kind not in COLLECTIVES:
            out.append(Leg((), profile.launch))  # a local slice or fill
    return out


@dataclass
class _Clocks:
    """The compute clock and one communication clock per process group: a group's collectives run one at a
    time, in issue order, and groups run beside each other (NCCL: a stream per communicator; gloo: a
    thread per group)."""

    overlap: float = 1.0  # the share of a started collective that runs beside compute (the profile's)
    compute: float = 0.0
    comm: dict[tuple[int, ...], float] = field(default_factory=dict)  # when each group is next free
    busy: float = 0.0  # total communication time
    exposed: float = 0.0
    boxed: float = 0.0  # the boxing cost charged to compute

    def _run(self, legs: Sequence[Leg], at: float) -> float:
        for leg in legs:
            at = max(at, self.comm.get(leg.group, 0.0)) + leg.seconds
            self.comm[leg.group] = at
            self.busy += leg.seconds
        return at

    def blocking(self, legs: Sequence[Leg]) -> None:
        """A synchronous communication: it waits for its groups' earlier ones, and compute waits for it."""
        self.wait(self._run(legs, self.compute))

    def boxing(self, legs: Sequence[Leg], overhead: float) -> None:
        """A synchronous boxing: blocking, and if it runs a collective, ``overhead`` more on the compute clock
        (the boxing runtime's work around it, and the partner that reaches it late)."""
        if any(leg.group for leg in legs):
            self.compute += overhead
            self.boxed += overhead
        self.blocking(legs)

    def started(self, legs: Sequence[Leg]) -> float:
        """A communication started now, finishing in the background; returns when it finishes. The share
        that cannot run beside compute (it takes the cores compute runs on) delays compute by as much."""
        end = self._run(legs, self.compute)
        shared = (1.0 - self.overlap) * sum(leg.seconds for leg in legs)
        self.compute += shared
        self.exposed += shared
        return end

    def wait(self, until: float) -> None:
        if until > self.compute:
            self.exposed += until - self.compute
            self.compute = until


class Walk(NamedTuple):
    """A program walked on a profile."""

    clocks: _Clocks  # at its end
    phases: dict[str, float]  # compute seconds by phase
    ready: dict[int, float]  # when each update unit's gradients are ready
    backward_end: float  # when backward's compute ended


def program_time(ir: StepIR, profile: DeviceProfile, rank: int, start: int = 0, stop: int | None = None) -> Walk:
    """Walk ``ir``, lowered for ``rank`` (its instructions ``start:stop``: a stage's forward or backward)."""
    clocks, phases = _Clocks(profile.overlap), {"forward": 0.0, "backward": 0.0, "recompute": 0.0}
    handles: dict[str, float] = {}
    unit_ready: dict[int, float] = {}
    backward_end = 0.0
    for i, ins in enumerate(ir.body[start:stop], start):
        if isinstance(ins, Op):
            seconds = op_seconds(ins.work, profile)
            clocks.compute += seconds
            phase = ins.work.phase if ins.work is not None else "forward"
            phases[phase] = phases.get(phase, 0.0) + seconds
            for plan in ins.work.boxes if ins.work is not None else ():  # a local function's own collectives
                clocks.boxing(plan_legs(plan, rank, profile), profile.box_overhead)
        elif isinstance(ins, Launch):
            assert ins.comm is not None
            packing = 2 * ins.comm.nbytes / profile.memory_bandwidth * profile.kernel_scale  # into a buffer
            clocks.compute += packing + profile.launch
            handles[ins.out] = clocks.started(legs(ins.comm, rank, profile))
        elif isinstance(ins, GatherStart):
            clocks.compute += profile.launch
            handles[ins.out] = clocks.started(legs(ins.comm, rank, profile))
        elif isinstance(ins, Box):
            if ins.src in handles:  # finishing a started gather
                clocks.wait(handles[ins.src])
            else:
                clocks.boxing(legs(ins.comm, rank, profile), profile.box_overhead)
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
    return Walk(clocks, phases, unit_ready, backward_end or clocks.compute)


def _released(release: Release, handles: dict[str, float], clocks: _Clocks, ready: dict[int, float]) -> None:
    if release.unit is not None:
        payload = release.payload[0] if release.bucket and release.payload else ""
        ready[release.unit] = max(handles.get(payload, 0.0), clocks.compute)


def update_seconds(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], profile: DeviceProfile, skipped: int = 0
) -> float:
    """One update of ``params`` (with ``skipped`` more of the optimizer's parameters, which have no gradient
    at this step): timed on this machine where the profile is its own, else its kernels' launch floors and its
    passes over them at memory bandwidth (an update is element-wise: memory bound)."""
    if not params:
        return 0.0
    nbytes = sum(p.numel() * p.element_size() for p in params)
    here = timed_here(profile, 0.0, 4 * nbytes)  # timing it holds parameters, gradients and two states
    timed = update_seconds_here(optimizer, params, profile, skipped) if here else None
    if timed is not None:
        return timed * profile.kernel_scale + profile.launch
    name = type(optimizer).__name__
    kernels, passes = _UPDATE_WORK.get(name, (4, 12))
    if name == "SGD" and any(g.get("momentum", 0) for g in optimizer.param_groups):
        kernels, passes = 3, 8
    groups = optimizer.param_groups
    fused = any(g.get("fused") for g in groups)  # one kernel over every tensor, reading and writing each once
    if fused:
        passes = min(passes, 7)
    # torch picks foreach kernels by default for CUDA tensors only (the estimate's tensors are on meta)
    foreach = fused or any(g.get("foreach") for g in groups)
    foreach |= profile.device_type == "cuda" and all(g.get("foreach") is None for g in groups)
    launches = (1 if fused else kernels) * (1 if foreach else len(params))
    return launches * profile.launch + passes * nbytes / profile.memory_bandwidth * profile.kernel_scale


def step_time(pm: ParallelModule, program: Program, profile: DeviceProfile) -> StepTime:
    """``pm``'s step on this rank (``program``, lowered for it): the program's walk, then the updates."""
    assert program.ir is not None
    clocks, phases, ready, backward_end = program_time(program.ir, profile, world()[0])
    units = [[pm.local_params[program.grad_of[k]] for k in unit.grads] for unit in program.units]
    every = [p for unit in units for p in unit]
    once = pm.updates == "after" or pm.max_grad_norm is not None or not program.units
    if once:  # one step over every parameter, after the program
        per_unit = [update_seconds(pm.optimizer, every, profile)]
    else:  # a step per unit, walking past the parameters of every other unit (they have no gradient)
        per_unit = [update_seconds(pm.optimizer, unit, profile, len(every) - len(unit)) for unit in units]
    update = sum(per_unit)
    end = clocks.compute
    if once or pm.updates == "inline":
        end += update
    else:  # each unit updated once its gradients are reduced, in release order, beside the program
        chain = backward_end if pm.updates == "loop" else 0.0  # the loop shares the compute thread
        for u, seconds in enumerate(per_unit):
            chain = max(chain, ready.get(u, backward_end)) + seconds
        end = max(end, chain)
    rank = world()[0]
    after = 0.0  # what follows the updates: ZeRO-1/2's all-gather of the updated pieces
    for i, (p, sl) in enumerate(zip(pm.params, pm.slices)):
        if sl is not None:
            group = pm.mesh.slice_over([a for a, (h, o) in enumerate(zip(p.sbp, pm.opt_sbps[i])) if h != o], rank)
            after += profile.collective("all_gather", len(group), p._local.numel() * p._local.element_size(), group)
    if pm.max_grad_norm is not None:  # the gradients' norm (a pass over them) summed over the mesh, then scaled
        grads = sum(q.numel() * q.element_size() for q in pm.local_params if q.requires_grad)
        norm = 3 * grads / profile.memory_bandwidth * profile.kernel_scale
        after += norm + profile.collective("all_reduce", pm.mesh.size, 4, pm.mesh.ranks)
    comm = clocks.busy + after
    total = end + after + profile.step_overhead
    return StepTime(
        total, phases, comm, clocks.exposed + after, update + after, runtime=profile.step_overhead, boxing=clocks.boxed
    )
