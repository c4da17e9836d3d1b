"""``plan.estimate``: a plan's memory per rank and step time, without running it or any process group.

Each rank is priced by building its ``ParallelModule`` of the plan on a virtual mesh from a meta-device copy
of the model, acting as that rank (``placement.mesh.acting_as``): its program is lowered exactly as a real
rank's, so its memory is the same report ``pm.memory()`` gives (``graph/parallel_memory.py``), and its time
is the program's walk on a device profile (``graph/step_time.py``). Ranks whose shards all have the same
shapes lower to the same program, so one of each class is priced: a 1,024-rank data-parallel plan is one
rank. The traced step depends on shapes only, so an ``Estimator`` traces it once for every plan it prices.
A pipeline is priced stage by stage (``graph/estimate_pipeline.py``), its schedule walked for the span.
Decision: reuse the compiler rather than model it — an estimate can only differ from the compiled module
by what the profile gets wrong, never by a second copy of the layout rules.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from shardflow.cost.profile import DeviceProfile, device_profile
from shardflow.graph.estimate_pipeline import FakeModel, fake_model, price_stages, stage_times
from shardflow.graph.flops import joint_flops, skeleton
from shardflow.graph.joint import Joint, trace_step
from shardflow.graph.parallel_memory import parallel_memory
from shardflow.graph.parallel_module import ParallelModule
from shardflow.graph.program import Program
from shardflow.graph.step_time import StepTime, step_time
from shardflow.ops.flop_count import Flops
from shardflow.placement.mesh import Mesh, acting_as
from shardflow.placement.shard import local_shape
from shardflow.plan import ParallelPlan, PlanError
from shardflow.plan.record import ESTIMATORS
from shardflow.runtime.memory import MemoryReport, fmt_bytes
from shardflow.runtime.runner import OptimizerFactory, default_optimizer


@dataclass(frozen=True)
class RankClass:
    """Ranks whose programs are the same, priced once (on ``ranks[0]``)."""

    ranks: tuple[int, ...]
    memory: MemoryReport
    time: StepTime | None  # None: priced for memory only


@dataclass(frozen=True)
class Estimate:
    """A plan priced on a device profile: ``peak_bytes`` per rank of the plan's mesh (in mesh order),
    ``step_seconds`` (the slowest rank's step), and how they were reached."""

    plan: ParallelPlan = field(repr=False)
    device: str
    peak_bytes: tuple[int, ...] = field(repr=False)  # thousands of figures on a large mesh
    step_seconds: float
    flops: Flops = field(repr=False)  # the logical step's
    classes: tuple[RankClass, ...] = field(default=(), repr=False)
    peak_flops: float = 0.0  # one device's peak in the step's dtype (the profile's), for MFU

    @property
    def mfu(self) -> float:
        """Model FLOPs per second over the peak of every device of the plan's mesh."""
        devices = self.plan.mesh.size
        return self.flops.total / self.step_seconds / (devices * self.peak_flops) if self.peak_flops else 0.0

    def explain(self) -> str:
        slow = max(self.classes, key=lambda c: c.time.total if c.time else 0.0)
        assert slow.time is not None
        lines = [
            f"estimate on {self.device}: {self.step_seconds * 1e3:.2f} ms per step, peak "
            f"{fmt_bytes(max(self.peak_bytes))} on the fullest rank, MFU {self.mfu:.1%}",
            f"{len(self.classes)} distinct rank program(s) priced for {self.plan.mesh.size} rank(s)",
            f"slowest (rank {slow.ranks[0]}): {slow.time.explain()}",
        ]
        return "\n".join(lines)


LOWERED_KEPT = 8  # plans whose programs an Estimator keeps, for pricing them again on another device
_WARNED: set[tuple[str, int]] = set()  # (profile, plan size) pairs told once per process that they differ


class _Lowered(NamedTuple):
    """One rank class of a plan, lowered: its ranks, the world it was lowered in, its module and program, and
    its memory."""

    ranks: tuple[int, ...]
    world: int
    pm: ParallelModule
    program: Program
    memory: MemoryReport


class Estimator:
    """Prices plans of one model on one batch: ``estimator(plan)`` -> ``Estimate``. ``traces`` and
    ``lowerings`` count the work done, so a search can see that thousands of ranks cost a handful."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Sequence[Any],
        optimizer: OptimizerFactory | None = None,
        device: str | DeviceProfile | None = None,
    ) -> None:
        self.device = device
        self.model = skeleton(model)
        self.inputs = tuple(_meta(x) for x in example_inputs)
        self.optimizer = optimizer or default_optimizer
        self.joints: dict[Any, Joint] = {}
        self.lowerings = 0
        self.stage_traces = 0
        self._shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        self._lowered: dict[ParallelPlan, list[_Lowered]] = {}  # recent plans: priced again on other devices

    @property
    def traces(self) -> int:
        """Steps (and pipeline stages) traced so far."""
        return len(self.joints) + self.stage_traces

    @functools.cached_property
    def profile(self) -> DeviceProfile:
        return device_profile(self.device)

    def __call__(self, plan: ParallelPlan, device: str | DeviceProfile | None = None) -> Estimate:
        """``plan``'s memory and time; on ``device`` instead of the estimator's own profile if given (a search
        comparing devices, a calibration solving for one of a profile's figures)."""
        profile = device_profile(device) if device is not None else self.profile
        if profile.ranks and plan.mesh.size != profile.ranks and (profile.name, plan.mesh.size) not in _WARNED:
            _WARNED.add((profile.name, plan.mesh.size))
            warnings.warn(
                f"the {profile.name} profile's in-step costs were fitted for {profile.ranks} ranks, this plan has "
                f"{plan.mesh.size}; for closer prices run `shardflow calibrate --ranks {plan.mesh.size}`",
                stacklevel=2,
            )
        classes, flops = self._price(plan, profile)
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        return Estimate(
            plan,
            profile.name,
            _per_rank(classes, plan),
            max(c.time.total for c in classes if c.time is not None),
            flops,
            tuple(classes),
            profile.peak(str(dtype).removeprefix("torch.")),
        )

    def peak_bytes(self, plan: ParallelPlan) -> tuple[int, ...]:
        """``plan``'s predicted peak per rank, in mesh order (no device profile needed)."""
        return _per_rank(self._price(plan, None)[0], plan)

    def _price(self, plan: ParallelPlan, profile: DeviceProfile | None) -> tuple[list[RankClass], Flops]:
        """Every rank class's memory, and its time on ``profile`` (None: memory only)."""
        if plan.pipeline is not None:
            return self._price_pipeline(plan, profile)
        if len(plan.inputs) != len(self.inputs):
            raise PlanError(f"the plan has {len(plan.inputs)} inputs, the example {len(self.inputs)}: give its inputs")
        lowered = self._lowered.pop(plan, None) or self._lower(plan)
        self._lowered[plan] = lowered  # the most recent last: the oldest goes first
        while len(self._lowered) > LOWERED_KEPT:
            del self._lowered[next(iter(self._lowered))]
        classes = []
        for low in lowered:
            with acting_as(low.ranks[0], low.world):
                time = step_time(low.pm, low.program, profile) if profile is not None else None
            classes.append(RankClass(low.ranks, low.memory, time))
        assert lowered[-1].program.flops is not None
        return classes, lowered[-1].program.flops

    def _lower(self, plan: ParallelPlan) -> list[_Lowered]:
        """Each rank class's program and memory under ``plan`` (they do not depend on the device)."""
        mesh = plan.mesh.build(virtual=True)
        out = []
        for ranks in self.rank_classes(plan, mesh):
            world = max(mesh.ranks) + 1
            with acting_as(ranks[0], world):
                pm = ParallelModule(self.model, mesh, plan, self.optimizer)
                pm.joints = self.joints
                pm.example_inputs = self.inputs
                program = pm.program(pm._inputs(self.inputs))
                self.lowerings += 1
                out.append(_Lowered(ranks, world, pm, program, parallel_memory(pm, ())))
        return out

    def _price_pipeline(self, plan: ParallelPlan, profile: DeviceProfile | None) -> tuple[list[RankClass], Flops]:
        """Each stage priced on its first rank (``graph/estimate_pipeline.py``); its ranks share its figures."""
        stages = price_stages(plan, self._fake, self.optimizer, profile)
        self.lowerings += len(stages)
        self.stage_traces += len(stages)  # each stage's cut and its program's trace
        times = stage_times(stages, profile) if profile is not None else [None] * len(stages)
        return [RankClass(s.ranks, s.memory, t) for s, t in zip(stages, times)], self._logical_flops

    @functools.cached_property
    def _fake(self) -> FakeModel:
        return fake_model(self.model, self.inputs)

    @functools.cached_property
    def _logical_flops(self) -> Flops:
        """The whole step's FLOPs (a pipeline's stages count their own shares)."""
        joint = trace_step(self.model, self.inputs, "cpu")
        self.stage_traces += 1
        return joint_flops(joint).with_rank(Flops())

    def rank_classes(self, plan: ParallelPlan, mesh: Mesh) -> list[tuple[int, ...]]:
        """The mesh's ranks grouped by the local shapes of every layout of every parameter and input (equal
        shapes: the same program), in mesh order."""
        combos: dict[tuple[Any, ...], None] = {}
        for name, shape in self._shapes.items():
            e = plan.params[name]
            for sbp in (e.sbp, e.compute, e.grad, e.optim):
                combos[(shape, sbp)] = None
        for x, sbp in zip(self.inputs, plan.inputs):
            if isinstance(x, torch.Tensor):
                combos[(tuple(x.shape), sbp)] = None
        groups: dict[tuple[Any, ...], list[int]] = {}
        for r in mesh.ranks:
            coord = mesh.coord_of(r)
            key = tuple(tuple(local_shape(shape, sbp, mesh.shape, coord)) for shape, sbp in combos)
            groups.setdefault(key, []).append(r)
        return [tuple(g) for g in groups.values()]


def estimate(
    plan: ParallelPlan,
    model: nn.Module,
    example_inputs: Sequence[Any],
    optimizer: OptimizerFactory | None = None,
    device: str | DeviceProfile | None = None,
) -> Estimate:
    """``plan`` priced for ``model`` on ``example_inputs`` (one step's global batch) on ``device``'s profile."""
    return Estimator(model, example_inputs, optimizer, device)(plan)


ESTIMATORS.append(estimate)  # ``plan.estimate`` (plan/record.py) calls it


def _per_rank(classes: Sequence[RankClass], plan: ParallelPlan) -> tuple[int, ...]:
    """Each rank's predicted peak, in the order of the plan's mesh, from the classes that price them."""
    by_rank = {r: c.memory.peak for c in classes for r in c.ranks}
    return tuple(by_rank[r] for r in plan.mesh.ranks)


def _meta(x: Any) -> Any:
    """An input as a meta tensor of its global shape (a GlobalTensor's too: its shape is global), else as it is."""
    if isinstance(x, torch.Tensor):
        return torch.empty(tuple(x.shape), dtype=x.dtype, device="meta")
    return x
