"""A pipeline's forward-only pass (``PipelineModule.evaluate``): each micro-batch through this rank's stage under
``no_grad`` with a step's messages, the batch's loss summed on every rank. The stages' torch.export graphs bake
dropout's training flag in, so evaluation runs an eval copy of each stage, its training arguments set to eval.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from torch import fx, nn

from shardflow.comm.groups import group_for
from shardflow.runtime.schedule import Action
from shardflow.runtime.schedule_run import _rows, naming
from shardflow.runtime.stage_cut import shape_key

if TYPE_CHECKING:
    from shardflow.runtime.pipeline import PipelineModule

# ATen arguments that a module's training flag sets (dropout's family, rrelu and RNNs' train, attention's
# dropout probability), by name in the op's schema, and their value in eval mode
EVAL_ARGUMENTS: dict[str, Any] = {"train": False, "training": False, "dropout_p": 0.0}


class _Received(NamedTuple):
    """The receives posted for one micro-batch's activations, and the buffers they fill."""

    works: list[Any]
    bufs: list[torch.Tensor]


def eval_copy(module: nn.Module) -> nn.Module:
    """A copy of the stage module ``module`` (in eval mode) that computes what its model computes in eval
    mode, sharing its parameters and buffers, so that it sees every update."""
    shared = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    out = copy.deepcopy(module, memo={id(t): t for _, t in shared})
    for sub in _graph_modules(out):
        changed = False
        for node in sub.graph.nodes:
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                changed |= _set_eval_arguments(node)
        if changed:  # regenerate the code the module runs from its edited graph
            if isinstance(sub, fx.GraphModule):
                sub.recompile()
            else:
                sub.finalize()  # torch.export's InterpreterModule
    return out.eval()


def _graph_modules(root: nn.Module) -> Iterator[Any]:
    """Every module under ``root`` that runs an fx graph, with the later calls' modules of a module called
    several times (torch.export's InterpreterModuleDispatcher keeps those apart from its children)."""
    seen: set[int] = set()
    for m in root.modules():
        for sub in [m, *getattr(m, "_call_modules", ())]:
            if isinstance(getattr(sub, "graph", None), fx.Graph) and id(sub) not in seen:
                seen.add(id(sub))
                yield sub


def _set_eval_arguments(node: fx.Node) -> bool:
    """Give ``node``'s training arguments (``EVAL_ARGUMENTS``) their eval values; whether any changed."""
    changed = False
    for i, arg in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if arg.name not in EVAL_ARGUMENTS:
            continue
        value = EVAL_ARGUMENTS[arg.name]
        if i < len(node.args):
            changed |= node.args[i] != value
            node.args = (*node.args[:i], value, *node.args[i + 1 :])
        elif node.kwargs.get(arg.name, arg.default_value) != value:
            node.kwargs = {**node.kwargs, arg.name: value}
            changed = True
    return changed


def refuse_method(method: str) -> None:
    """Refuse an ``evaluate`` of another method than forward, with the fix."""
    if method != "forward":
        raise ValueError(
            f"a pipelined module cannot evaluate method {method!r}: it is cut into stages along its forward, "
            "so it evaluates the forward (the loss) only; for predict or another method, compile a plan "
            "without a pp axis (no pipeline=)"
        )


def evaluate_loss(pm: PipelineModule, micro: list[list[Any]], weights: list[float]) -> torch.Tensor:
    """The loss of the whole batch, a 0-d tensor equal on every rank of the mesh (collective over it), with
    the stage modules in eval mode (left in training mode after): this stage's forward on this rank's shards
    ``micro`` of every micro-batch, in order, activations received and sent as ``run_schedule`` does, the
    micro-batches' losses weighed by their shares ``weights`` of the batch."""
    for module in pm.modules.values():
        module.eval()
    try:
        total = _forward_pass(pm, micro, weights)
    finally:
        for module in pm.modules.values():
            module.train()
    if pm.mesh.size > 1:
        dist.all_reduce(total, group=group_for(pm.mesh.ranks).group)
    return total


def _forward_pass(pm: PipelineModule, micro: list[list[Any]], weights: list[float]) -> torch.Tensor:
    """This rank's part of the loss: its last-stage shards' weighted losses (tp rank 0 only), else 0."""
    first, last = pm.stage == 0, pm.stage == pm.stages - 1
    sends: list[Any] = []
    losses: list[torch.Tensor] = []

    def receive(j: int) -> _Received:
        if first:
            return _Received([], [])
        bufs = [torch.empty(shape, dtype=dtype) for shape, dtype in pm._meta(micro[j])[pm.stage - 1]]
        works = [dist.irecv(_rows(b)[p.rows], p.peer, tag=0) for b, ps in zip(bufs, pm.pieces[j].recv) for p in ps]
        return _Received(works, bufs)

    with torch.no_grad():
        posted = receive(0)
        for j in range(len(micro)):
            received = posted
            if j + 1 < len(micro):
                posted = receive(j + 1)  # the next micro-batch's activations travel while this one computes
            for w in received.works:
                w.wait()
            args = [micro[j][k] if src == "input" else received.bufs[k] for src, k in pm.split.wiring[pm.stage]]
            with naming(pm, Action("F", j)):
                out = pm._run_stage(shape_key(micro[j]), args)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            if last:
                losses.append(outs[0] * weights[j])
            else:
                # a send holds its tensor until waited for: drop the finished ones, not every output to the end
                sends = [w for w in sends if not w.is_completed()]
                to = pm.pieces[j].send
                sends += [
                    dist.isend(_rows(o.contiguous())[p.rows], p.peer, tag=0) for o, ps in zip(outs, to) for p in ps
                ]
        for w in sends:
            w.wait()
    # a tensor-parallel stage holds each loss on every tp rank: one counts
    dtype = pm._meta(micro[0])[-1][0][1]
    return torch.stack(losses).sum() if last and pm.tp_index == 0 else torch.zeros((), dtype=dtype)
