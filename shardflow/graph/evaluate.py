"""Evaluation programs: one method of the model, forward only, lowered like a training step.

``pm.evaluate(*inputs, method=...)`` traces ``getattr(model, method)(*inputs)`` under ``torch.no_grad()``
with the model in eval mode (dropout off, BatchNorm's running statistics), on fake tensors, and lowers it
through the step's own passes: the layout pass (every op's signature, boxing) and, under ZeRO-3, the gathers
and their prefetch. There is no backward, so no bucket, release or update, and every tensor result is boxed
to ``B``: each rank returns the full value. Parameters, optimizer state and the RNG are never touched.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from shardflow.graph.ir.codegen import build
from shardflow.graph.ir.instr import Return
from shardflow.graph.ir.layouts import LayoutPass
from shardflow.graph.ir.liveness import timeline
from shardflow.graph.ir.prefetch import prefetch
from shardflow.graph.ir.verify import verify
from shardflow.graph.joint import Joint, attention_kernels, fake_arguments
from shardflow.graph.program import Program
from shardflow.graph.values import module_paths, value_keys
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, NdSbp
from shardflow.runtime.capture_errors import explained

_TENSOR = object()  # marks where a tensor result goes among the method's constant (non-tensor) results


class _Method(nn.Module):
    """``forward(*inputs)``: the wrapped model's method ``name`` (functional_call swaps the model's tensors)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name = model, name

    def forward(self, *inputs: Any) -> Any:
        return getattr(self.model, self.name)(*inputs)


@dataclass(frozen=True)
class EvalTrace:
    """A traced method: ``joint.graph(params, buffers, inputs) -> [tensor results]``, and how to rebuild its
    result (``tree``; ``leaves`` holds the non-tensor results, ``_TENSOR`` where a tensor goes)."""

    joint: Joint
    tree: pytree.TreeSpec
    leaves: tuple[Any, ...]


@dataclass
class EvalProgram:
    """This rank's lowered evaluation and how to rebuild the method's result from the program's outputs."""

    program: Program
    tree: pytree.TreeSpec
    leaves: tuple[Any, ...]

    def __call__(self, args: Sequence[Any]) -> Any:
        run = self.program.run if self.program.ran else self.program.checked  # the first run checks shapes
        with torch.no_grad():
            outs = iter(run(list(args)))
        self.program.ran = True
        return pytree.tree_unflatten([next(outs) if x is _TENSOR else x for x in self.leaves], self.tree)


def trace_method(model: nn.Module, method: str, inputs: Sequence[Any], device: str = "cpu") -> EvalTrace:
    """Trace ``getattr(model, method)(*inputs)`` forward only, on fake tensors of the global shapes, in the
    mode the model is in (the caller puts it in eval mode)."""
    named = dict(model.named_parameters())
    bnamed = dict(model.named_buffers())
    structure: list[Any] = []

    def forward(ps: list[torch.Tensor], bs: list[torch.Tensor], xs: list[Any]) -> list[torch.Tensor]:
        state = {**{"model." + n: t for n, t in zip(named, ps)}, **{"model." + n: b for n, b in zip(bnamed, bs)}}
        result = functional_call(_Method(model, method), state, tuple(xs))
        leaves, tree = pytree.tree_flatten(result)
        structure[:] = [tree, tuple(_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves)]
        return [x for x in leaves if isinstance(x, torch.Tensor)]

    ps, bs, xs = fake_arguments(model, inputs, device)
    stage = f"tracing {type(model).__name__}.{method} (evaluation, forward only) on fake tensors"
    with torch.no_grad(), attention_kernels(device), explained(model, stage), module_paths(model):
        graph = make_fx(forward, tracing_mode="fake")(ps, bs, xs)
    value_keys(graph.graph)
    n_out = sum(x is _TENSOR for x in structure[1])
    return EvalTrace(Joint(graph, len(ps), len(bs), (), n_values=n_out, forward_only=True), *structure)


def lower_eval(
    traced: EvalTrace,
    mesh: Mesh,
    rank: int,
    sbps: Sequence[NdSbp | None],
    zero_axis: int | None = None,
    values: Mapping[str, NdSbp] | None = None,
    gathered: Collection[int] | None = None,
) -> EvalProgram:
    """This rank's evaluation program; like a step, under both policies for partial sums, the cheaper wins."""
    programs = [_lower(traced.joint, mesh, rank, sbps, policy, zero_axis, values, gathered) for policy in (True, False)]
    return EvalProgram(min(programs, key=lambda p: p.cost), traced.tree, traced.leaves)


def _lower(
    joint: Joint,
    mesh: Mesh,
    rank: int,
    sbps: Sequence[NdSbp | None],
    reduce_to_split: bool,
    zero_axis: int | None,
    values: Mapping[str, NdSbp] | None,
    gathered: Collection[int] | None,
) -> Program:
    lp = LayoutPass(joint, mesh, rank, sbps, reduce_to_split, zero_axis, (), values, gathered, False)
    lp.run()
    ir = lp.ir
    verify(ir, "the layout pass")
    if zero_axis is not None:
        prefetch(ir, mesh, rank, zero_axis)
        verify(ir, "prefetch")
    output = next(n for n in joint.graph.graph.nodes if n.op == "output")
    results = list(output.args[0])[: joint.n_values]  # type: ignore[arg-type]
    outs = tuple(lp.box(node, (B,) * mesh.ndim, "result")[0] for node in results)
    ir.emit(Return(loss=None, grads=(), outputs=outs))
    verify(ir, "the results")
    code = build(ir, None)
    collectives = [ins.comm for ins in ir.body if ins.comm is not None]
    cost = sum(c.plan.seconds for c in collectives if c.plan is not None)
    return Program(
        code.source,
        code.fast["step"],
        code.checked["step"],
        lp.record,
        (),
        collectives,
        cost,
        timeline(ir, outs),
        ir=ir,
    )
