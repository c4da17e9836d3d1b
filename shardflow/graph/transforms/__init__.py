"""Strategies as transforms ``ParallelPlan -> ParallelPlan``, one module each (torchtitan's ``apply_tp`` /
``apply_fsdp`` style, on a value instead of a module): ``data_parallel``, ``tensor_parallel``, ``zero``,
``pipeline``, ``recompute``, ``hints``. ``build_plan`` composes them as ``sf.compile``'s keywords say
(``"hybrid"`` is tp then dp); ``sf.plan`` returns its result and ``sf.compile`` compiles it.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from shardflow.graph.capture import Captured, capture
from shardflow.graph.strategy import axes_for
from shardflow.graph.transforms.data_parallel import apply_dp
from shardflow.graph.transforms.hints import apply_hints, apply_input_sbp, input_layouts
from shardflow.graph.transforms.pipeline import apply_pipeline
from shardflow.graph.transforms.recompute import apply_recompute, recompute_targets
from shardflow.graph.transforms.tensor_parallel import apply_tp
from shardflow.graph.transforms.zero import apply_zero
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, NdSbp, Placement
from shardflow.plan import STRATEGIES, Execution, MeshSpec, ParallelPlan, ParamPlan, default_updates
from shardflow.runtime.pipeline import Pipeline

__all__ = [
    "apply_dp",
    "apply_hints",
    "apply_input_sbp",
    "apply_pipeline",
    "apply_recompute",
    "apply_tp",
    "apply_zero",
    "base_plan",
    "build_plan",
    "input_layouts",
    "param_layouts",
    "recompute_targets",
]


def base_plan(mesh: Mesh | MeshSpec, strategy: str, model: nn.Module, n_inputs: int) -> ParallelPlan:
    """Every parameter and input replicated, default options: what the transforms start from."""
    spec = mesh if isinstance(mesh, MeshSpec) else MeshSpec.of(mesh)
    replicated: NdSbp = (B,) * spec.ndim
    return ParallelPlan(
        mesh=spec,
        strategy=strategy,
        params={n: ParamPlan.plain(replicated) for n, _ in model.named_parameters()},
        inputs=(replicated,) * n_inputs,
        execution=Execution(updates=default_updates(spec)),
    )


def build_plan(
    model: nn.Module,
    mesh: Mesh | MeshSpec,
    example_inputs: Sequence[Any],
    strategy: str = "dp",
    hints: Mapping[str, Placement | Sequence[Placement]] | None = None,
    input_sbp: Any = None,
    max_grad_norm: float | None = None,
    pipeline: Pipeline | None = None,
    zero: int = 0,
    recompute: bool | Sequence[str] = False,
    arena: bool | str = False,
    cuda_graphs: bool = False,
    inductor: bool = False,
    captured: Captured | None = None,
) -> ParallelPlan:
    """The plan ``sf.compile`` builds from its keywords (``recompute="auto"`` aside: it searches)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    plan = base_plan(mesh, strategy, model, len(example_inputs))
    plan = plan.replace(max_grad_norm=max_grad_norm, arena=arena, cuda_graphs=cuda_graphs, inductor=inductor)
    if pipeline is not None:
        return apply_pipeline(plan, pipeline, model, example_inputs)
    dp, tp = axes_for(mesh, strategy)
    if zero and dp is None:
        raise ValueError(f"zero={zero} shards over the data-parallel axis; strategy {strategy!r} on {mesh} has none")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if captured is None:  # also for dp: a model torch.export cannot capture is refused here, naming why
        ours = capture(model, _plain(example_inputs))
        if tp is not None:
            plan = apply_tp(plan, ours, mesh.names[tp])
        # torch.export's program holds the model's parameters in reference cycles: collected now, not at
        # some later step, where a copy of the model given to sf.compile would count against its peak
        del ours
        gc.collect()
    elif tp is not None:
        plan = apply_tp(plan, captured, mesh.names[tp])
    if dp is not None:
        plan = apply_dp(plan, mesh.names[dp])
    if hints:
        plan = apply_hints(plan, hints, shapes)
    if input_sbp is not None:
        plan = apply_input_sbp(plan, input_sbp, len(example_inputs))
    if zero:
        assert dp is not None
        plan = apply_zero(plan, zero, mesh.names[dp], shapes)
    if recompute:
        plan = apply_recompute(plan, model, recompute)
    return plan


def param_layouts(
    model: nn.Module,
    mesh: Mesh,
    strategy: str,
    captured: Captured,
    hints: Mapping[str, Placement | Sequence[Placement]] | None = None,
) -> dict[str, NdSbp]:
    """An nd-SBP for every parameter of ``model`` under ``strategy`` and ``hints``."""
    plain = build_plan(model, mesh, [], strategy, hints, captured=captured)
    return plain.layouts()


def _plain(inputs: Sequence[Any]) -> list[Any]:
    return [x.full() if hasattr(x, "full") and hasattr(x, "sbp") else x for x in inputs]
