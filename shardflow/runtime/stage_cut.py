"""A model cut into pipeline stages for the micro-batches a step runs: every stage's module, per shape.

``stages.py`` cuts (torch.export at module boundaries); here the cut points are chosen when not given, each
stage's outputs are measured on fake tensors (receives need no size handshake), and a micro-batch of
another size, as ``tensor_split`` may make, gets its own cut sharing the first one's parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shardflow.runtime.pipeline_config import Pipeline
from shardflow.runtime.stages import Split, balanced_split_points, split_model
from shardflow.tensor.global_tensor import GlobalTensor

Meta = list[tuple[torch.Size, torch.dtype]]


@dataclass
class StageCut:
    """The cut as this rank uses it: the split, every stage's outputs per micro-batch shape, and this rank's
    stage module per micro-batch shape."""

    split: Split
    points: tuple[str, ...]
    metas: dict[Any, list[Meta]]
    modules: dict[Any, nn.Module]


def cut(
    model: nn.Module, pipeline: Pipeline, plain: Sequence[Any], micro: Sequence[Any], capacity: list[int], stage: int
) -> StageCut:
    """Cut ``model`` for micro-batches shaped like ``micro`` before ``pipeline.split_points`` (None: balanced
    by the FLOPs of the whole first micro-batch of ``plain`` over stages of ``capacity`` ranks each)."""
    stages = len(capacity)
    points = pipeline.split_points
    if points is None:  # the same on every rank
        whole = [x.tensor_split(pipeline.micro_batches)[0] if _batched(x) else x for x in plain]
        points = tuple(balanced_split_points(model, whole, stages, capacity=capacity))
    if len(points) != stages - 1:
        where = (
            f"{stages} stage meshes were given"
            if pipeline.stage_meshes
            else f"mesh axis {pipeline.axis!r} has {stages} ranks"
        )
        raise ValueError(
            f"{len(points)} split points {list(points)} make {len(points) + 1} stages, but {where}: "
            f"give {stages - 1} split points"
        )
    split = split_model(model, micro, points)
    key = shape_key(micro)
    return StageCut(split, points, {key: _boundaries(split, micro)}, {key: split.modules[stage]})


def cut_other_shapes(model: nn.Module, c: StageCut, micros: Sequence[Sequence[Any]], stage: int) -> None:
    """Cut for every other micro-batch shape in ``micros``, sharing the parameters of the first cut's stage
    module (torch.export specialises shapes; ``tensor_split``'s micro-batches may differ by a row)."""
    first = next(iter(c.modules.values()))
    for other in micros:
        key = shape_key(other)
        if key not in c.modules:
            again = split_model(model, other, c.points)
            c.metas[key] = _boundaries(again, other)
            c.modules[key] = _share(again.modules[stage], first)


def _batched(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() > 0


def shape_key(micro: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in micro)


def _share(module: nn.Module, like: nn.Module) -> nn.Module:
    """``module`` (the same stage cut for another shape) with ``like``'s parameters and buffers in place of its own."""
    for name, _ in list(module.named_parameters(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, attr, like.get_parameter(name))
    for name, _ in list(module.named_buffers(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        (module.get_submodule(owner) if owner else module).register_buffer(attr, like.get_buffer(name))
    return module


def plain(x: Any) -> Any:
    """The full tensor of a GlobalTensor input (a pipeline re-cuts the batch itself), other inputs as given."""
    return x.full() if isinstance(x, GlobalTensor) else x


def whole_batch(inputs: Sequence[Any], shapes: Sequence[tuple[int, ...] | None]) -> list[Any]:
    """The batch ``inputs`` as full tensors (``plain``), checked against the ``shapes`` the stages were cut for."""
    whole = [plain(x) for x in inputs]
    got = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in whole]
    if got != list(shapes):
        raise ValueError(
            f"pipeline inputs of shapes {got}, but the stages were cut for {list(shapes)}: "
            "compile again with example inputs of the new shape"
        )
    return whole


def _boundaries(split: Split, micro: Sequence[Any]) -> list[Meta]:
    """Shape and dtype of every tensor each stage returns, by running all stages on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    metas: list[Meta] = []
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in micro]
        prev: list[Any] = []
        for s, module in enumerate(split.modules):
            args = [inputs[k] if src == "input" else prev[k] for src, k in split.wiring[s]]
            out = module(*args)
            prev = list(out) if isinstance(out, (tuple, list)) else [out]
            metas.append([(o.shape, o.dtype) for o in prev])
    return metas
