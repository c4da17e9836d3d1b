"""Pipeline: the model cut into stages over a mesh axis (or over stage meshes of any sizes), a schedule and
micro-batches. Cut points left open are chosen here, balanced by FLOPs per rank of each stage, so the plan
names them. Stage parameters are laid out over each stage's ``(dp, tp)`` grid: whole over dp, and under
``strategy="tp"``/``"hybrid"`` in Megatron pairs over tp (the stage's tp axis, ``runtime/pipeline.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shardflow.graph.capture import capture
from shardflow.graph.transforms.tensor_parallel import apply_tp
from shardflow.placement.sbp import B
from shardflow.plan import MeshSpec, ParallelPlan, ParamPlan, PipelinePlan
from shardflow.runtime.pipeline import Pipeline
from shardflow.runtime.stages import balanced_split_points


def apply_pipeline(
    plan: ParallelPlan, pipeline: Pipeline, model: nn.Module, example_inputs: Sequence[Any]
) -> ParallelPlan:
    """``plan`` pipelined as ``pipeline`` says (its layouts become per-stage ``(dp, tp)`` layouts)."""
    if pipeline.stage_meshes is not None:
        meshes: tuple[MeshSpec, ...] | None = tuple(MeshSpec.of(m) for m in pipeline.stage_meshes)
        sizes = [m.size for m in meshes or ()]
    else:
        meshes = None
        pp = plan.mesh.axis(pipeline.axis) if pipeline.axis in plan.mesh.names else None
        if pp is None:
            raise ValueError(f"pipeline axis {pipeline.axis!r} is not an axis of the mesh {plan.mesh.names}")
        sizes = [plan.mesh.size // plan.mesh.shape[pp]] * plan.mesh.shape[pp]
    points = pipeline.split_points
    plain = [x.full() if hasattr(x, "full") else x for x in example_inputs]
    if points is None:  # cut by FLOPs of the whole first micro-batch (the same on every rank)
        m = pipeline.micro_batches
        whole = [x.tensor_split(m)[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in plain]
        points = tuple(balanced_split_points(model, whole, len(sizes), capacity=sizes))
    staged = PipelinePlan(
        pipeline.axis, tuple(points), pipeline.micro_batches, pipeline.schedule, pipeline.split_backward, meshes
    )
    params = {n: ParamPlan.plain((B, B)) for n in plan.params}
    # a stage updates once its last backward is over: the only update vehicle pipelines have
    out = plan.replace(pipeline=staged, params=params, inputs=(), updates="after")
    if plan.strategy in ("tp", "hybrid"):
        out = apply_tp(out, capture(model, plain), 1)  # the tp entry of each stage's (dp, tp) layouts
    return out
