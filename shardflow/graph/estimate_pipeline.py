"""A pipeline plan priced like any other plan: one ``PipelineModule`` per stage, built acting as the stage's
first rank on a virtual mesh, so its memory is the report ``pm.memory()`` gives (``runtime/pipeline_memory.py``).

The pipeline runtime cuts the model with ``torch.export`` on the devices it runs on, so the model is copied
onto *fake* CPU tensors (shapes without storage) rather than the meta device, whose cuts trace attention
another way. Each stage's lowered program is walked twice (its forward, its backward, with the boundary's
messages), the schedule's own walk (``runtime/schedule.makespan``) turns those into the step's span, bubbles
included, and each stage adds its gradient all-reduce over its data-parallel ranks and its update.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from shardflow.cost.profile import DeviceProfile
from shardflow.graph.stage_program import StageProgram
from shardflow.graph.step_time import StepTime, program_time, update_seconds
from shardflow.placement.mesh import acting_as
from shardflow.plan import ParallelPlan
from shardflow.runtime.memory import MemoryReport
from shardflow.runtime.pipeline import Pipeline, PipelineModule
from shardflow.runtime.pipeline_memory import pipeline_memory
from shardflow.runtime.runner import OptimizerFactory
from shardflow.runtime.schedule import makespan
from shardflow.runtime.stage_cut import plain
from shardflow.runtime.tensor_stage import local


class FakeModel(NamedTuple):
    """A model and a batch on fake CPU tensors: shapes and dtypes, no storage."""

    model: nn.Module
    inputs: tuple[Any, ...]


def fake_model(skeleton: nn.Module, inputs: Sequence[Any]) -> FakeModel:
    """``skeleton`` (a meta-device copy) and ``inputs`` (meta tensors) as fake CPU tensors."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        memo: dict[int, Any] = {}
        for p in skeleton.parameters():
            memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for b in skeleton.buffers():
            memo[id(b)] = torch.empty(b.shape, dtype=b.dtype)
        model = copy.deepcopy(skeleton, memo)
        fakes = tuple(torch.empty(x.shape, dtype=x.dtype) if isinstance(x, torch.Tensor) else x for x in inputs)
    return FakeModel(model, fakes)


class StagePrice(NamedTuple):
    """One stage as its first rank prices it."""

    ranks: tuple[int, ...]
    memory: MemoryReport
    module: PipelineModule
    forward: float  # one micro-batch's forward, its outputs sent on
    backward: float  # one micro-batch's backward, its inputs' gradients sent back
    sent: float  # of the forward, the send of its outputs
    sent_back: float  # of the backward, the send of its inputs' gradients


def price_stages(
    plan: ParallelPlan, fake: FakeModel, optimizer: OptimizerFactory, profile: DeviceProfile | None
) -> list[StagePrice]:
    """Every stage of ``plan``'s pipeline built and priced on its first rank (times 0 without a profile)."""
    mesh = plan.mesh.build(virtual=True)
    p = plan.pipeline
    assert p is not None
    if p.stage_meshes is not None and len({m.shape for m in p.stage_meshes}) > 1:
        raise NotImplementedError(
            "the cost model prices pipelines whose stages have equal meshes (it takes every rank's boundary "
            f"shapes to be its own); these stage meshes differ: {[str(m) for m in p.stage_meshes]}"
        )
    pipe = Pipeline(
        axis=p.axis,
        split_points=p.split_points,
        micro_batches=p.micro_batches,
        schedule=p.schedule,
        stage_meshes=None if p.stage_meshes is None else tuple(m.build(virtual=True) for m in p.stage_meshes),
        split_backward=p.split_backward,
    )
    stages: list[StagePrice] = []
    first = mesh.ranks[0]
    world = max(mesh.ranks) + 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # deepcopies of it
        while True:
            with acting_as(first, world):
                pm = PipelineModule(fake.model, mesh, pipe, fake.inputs, optimizer, plan, StageProgram, None)
                stages.append(_price(pm, profile))
            if len(stages) == pm.stages:
                return stages
            first = pm.stage_ranks[len(stages)][0]


def _price(pm: PipelineModule, profile: DeviceProfile | None) -> StagePrice:
    memory = pipeline_memory(pm, ())
    forward = backward = sent = back = 0.0
    if profile is not None:
        rank = pm.stage_ranks[pm.stage][0]
        micro = pm._micro_batches([plain(x) for x in pm.example_inputs])[0][0]
        ir = pm._program(micro).program.ir
        split = ir.split_at()
        forward = program_time(ir, profile, rank, 0, split).clocks.compute
        backward = program_time(ir, profile, rank, split).clocks.compute
        metas = pm._meta(micro)
        if pm.stage < pm.stages - 1:  # to the next stage's rank in the same place: maybe on another node
            pair = (rank, pm.stage_ranks[pm.stage + 1][0])
            sent = profile.collective("send_recv", 2, _nbytes(metas[pm.stage]), pair)
        if pm.stage > 0:
            pair = (rank, pm.stage_ranks[pm.stage - 1][0])
            back = profile.collective("send_recv", 2, _nbytes(metas[pm.stage - 1]), pair)
        # each action also runs the schedule's bookkeeping around its program (and a backward autograd's engine)
        forward, backward = forward + sent + profile.pipeline_action, backward + back + profile.pipeline_action
    return StagePrice(pm.stage_ranks[pm.stage], memory, pm, forward, backward, sent, back)


def stage_times(stages: Sequence[StagePrice], profile: DeviceProfile) -> list[StepTime]:
    """Each stage's step: the schedule's span (bubbles included), then its gradients all-reduced (over its
    data-parallel ranks; a tensor-parallel stage's replicated ones over all its ranks) and its update."""
    pm = stages[0].module
    p = pm.pipeline
    forward, backward = [s.forward for s in stages], [s.backward for s in stages]
    span = makespan(p.schedule, len(stages), p.micro_batches, forward, backward)
    out = []
    for s in stages:
        mod = s.module
        over_dp = sum(_bytes(q) for q in mod.params if q.requires_grad and id(q) not in mod.partial)
        over_stage = sum(_bytes(q) for q in mod.params if q.requires_grad and id(q) in mod.partial)
        reduce = profile.collective("all_reduce", len(mod.dp_ranks), over_dp, mod.dp_ranks)
        everyone = mod.stage_ranks[mod.stage]
        reduce += profile.collective("all_reduce", len(everyone), over_stage, everyone) if over_stage else 0.0
        update = update_seconds(mod.optimizer, mod.opt_params, profile) if mod.optimizer is not None else 0.0
        m = p.micro_batches
        busy = m * (s.forward + s.backward)
        sends = m * (s.sent + s.sent_back)  # on the stage's own time: the schedule's walk waits for them
        action = profile.pipeline_action  # on the stage's time, inside its span: the runtime's, not compute
        compute = {"forward": m * (s.forward - s.sent - action), "backward": m * (s.backward - s.sent_back - action)}
        runtime = 2 * m * action + profile.step_overhead
        total = span + reduce + update + profile.step_overhead
        out.append(StepTime(total, compute, sends + reduce, sends + reduce, update, span - busy, runtime))
    return out


def _bytes(p: torch.Tensor) -> int:
    q = local(p)
    return q.numel() * q.element_size()


def _nbytes(meta: Sequence[tuple[Any, torch.dtype]]) -> int:
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in meta)
