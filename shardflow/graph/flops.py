"""A step's FLOPs from what the compiler already has: the traced joint graph (the logical step, global
shapes) and this rank's lowered program (its ``Op`` instructions carry their local FLOPs, set by the layout
pass from the local shapes it chose). Formulas and the ``Flops`` record live in ``ops/``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from shardflow.graph.ir.instr import Op
from shardflow.graph.ir.step import StepIR
from shardflow.graph.joint import Joint, trace_step
from shardflow.ops.flop_count import Flops, FlopTally, graph_flops


def joint_flops(joint: Joint) -> Flops:
    """The logical step's FLOPs: every op of the traced graph on its global shapes; the forward ends with the
    last of the forward's results (the loss; a stage's outputs), an evaluation has no backward."""
    graph = joint.graph.graph
    end: fx.Node | None = None
    if not joint.forward_only:
        output = next(n for n in graph.nodes if n.op == "output")
        values = {n for n in output.args[0][: joint.n_values] if isinstance(n, fx.Node)}  # type: ignore[index]
        if not joint.n_grads_in:  # a step detaches its loss after backward: the forward ends at the loss itself
            values = {n.args[0] if n.target == torch.ops.aten.detach.default else n for n in values}  # type: ignore[misc]
        end = [n for n in graph.nodes if n in values][-1] if values else None
    return graph_flops(graph, end)


def program_flops(ir: StepIR) -> Flops:
    """What this rank computes: the FLOPs of its program's ops on their local shapes."""
    tally = FlopTally()
    for ins in ir.body:
        if isinstance(ins, Op) and ins.work is not None:
            tally.add(ins.work.op, ins.work.phase, ins.work.flops)
    return tally.result()


def model_flops(model: nn.Module, inputs: Sequence[Any], device: str = "cpu") -> Flops:
    """The logical FLOPs of a step of ``model(*inputs)`` (a scalar loss), traced on fake tensors."""
    return joint_flops(trace_step(model, inputs, device))


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no memory), for counting
    later without keeping the model's tensors alive."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)
