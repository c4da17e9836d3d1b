"""A tensor-parallel pipeline stage as a static program: its forward and backward traced once, lowered like a
compiled step, and run by the pipeline as one autograd node per micro-batch.

Why: run eagerly, every op of a tp stage goes through GlobalTensor dispatch and waits on each collective as
it comes; profiled, a GPT stage spent most of its time in those waits and ran several times slower than the
same stage data parallel (BENCHMARKS.md, Tensor-parallel stages). Here ``make_fx`` traces the stage's
forward and ``autograd.grad`` of its outputs (against gradients arriving as inputs) on fake tensors, the
compiler's lowering (``graph/lower.py``) picks every op's layout and writes plain per-rank code with its
collectives, and the code is cut where the forward ends: the forward returns the stage's outputs (boxed to
``B``) and the variables the backward reads, the backward takes them back with the arriving gradients.
Torch's pipelining runs its stages eagerly on DTensors when they are tensor parallel; a static program per
stage is what the seed's compiler does (a stage is a sub-graph like any other).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx

from shardflow.comm.init import world
from shardflow.graph.lower import Joint, Program, lower
from shardflow.graph.values import recomputations
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, NdSbp, P, Placement, grad_sbp
from shardflow.runtime.capture_errors import explained
from shardflow.tensor.global_tensor import GlobalTensor, wrap


@dataclass(frozen=True)
class StageJoint:
    joint: Joint
    differentiable: tuple[int, ...]  # the outputs that carry a gradient back (their grads_in, in order)
    needs_grad: tuple[bool, ...]  # per input: whether its gradient is computed


def trace_stage(module: nn.Module, inputs: Sequence[Any], needs_grad: Sequence[bool]) -> StageJoint:
    """Trace ``module(*inputs)`` and the gradients of its parameters and of the inputs in ``needs_grad``
    given gradients of its outputs: ``graph(params, buffers, inputs, grads_in) -> [*outputs, *grads,
    *input_grads]``, on fake tensors of the global shapes (GlobalTensor parameters are fine)."""
    named = dict(module.named_parameters())
    bnamed = dict(module.named_buffers())
    names, bnames = list(named), list(bnamed)
    stage = "tracing a pipeline stage's forward and backward on fake tensors"
    with explained(module, stage), FakeTensorMode(allow_non_fake_inputs=True) as mode:

        def fake(t: torch.Tensor) -> torch.Tensor:
            return torch.empty(tuple(t.shape), dtype=t.dtype)

        ps = [fake(p) for p in named.values()]
        bs = [fake(b) for b in bnamed.values()]
        xs = [fake(x) if isinstance(x, torch.Tensor) else x for x in inputs]
        leaves = [p.detach().requires_grad_(q.requires_grad) for p, q in zip(ps, named.values())]
        state = {**dict(zip(names, leaves)), **dict(zip(bnames, bs))}
        probe = [x.detach().requires_grad_(True) if need else x for x, need in zip(xs, needs_grad)]
        with torch.enable_grad():
            outs = functional_call(module, state, tuple(probe))
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        differentiable = tuple(i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.requires_grad)
        dys = [fake(outs[i]) for i in differentiable]
    del mode
    grad_of: list[int] = []
    n_outputs = len(outs)

    def step(ps: list[torch.Tensor], bs: list[torch.Tensor], xs: list[Any], dys: list[torch.Tensor]) -> list[Any]:
        leaves = [p.detach().requires_grad_(q.requires_grad) for p, q in zip(ps, named.values())]
        xs = [x.detach().requires_grad_(True) if need else x for x, need in zip(xs, needs_grad)]
        outs = functional_call(module, {**dict(zip(names, leaves)), **dict(zip(bnames, bs))}, tuple(xs))
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        values = [o.detach() for o in outs]  # the forward ends here: the lowering cuts its code after these
        wanted = [i for i, p in enumerate(leaves) if p.requires_grad]
        xleaves = [x for x, need in zip(xs, needs_grad) if need]
        grads = torch.autograd.grad(
            [outs[i] for i in differentiable], [leaves[i] for i in wanted] + xleaves, dys, allow_unused=True
        )
        pgrads = grads[: len(wanted)]
        grad_of[:] = [i for i, g in zip(wanted, pgrads) if g is not None]
        xgrads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads[len(wanted) :], xleaves)]
        return [*values, *[g for g in pgrads if g is not None], *xgrads]

    # the backward is traced whatever the caller's grad mode (an evaluation lowers its program under no_grad)
    # recomputed forwards tagged as such (their nodes' meta kept): a stage's FLOPs count them apart
    with explained(module, stage), torch.enable_grad(), fx_traceback.preserve_node_meta(), recomputations():
        graph = make_fx(step, tracing_mode="fake")(ps, bs, xs, dys)
    joint = Joint(
        graph,
        len(ps),
        len(bs),
        tuple(grad_of),
        n_values=n_outputs,
        n_grads_in=len(dys),
        n_input_grads=sum(needs_grad),
    )
    return StageJoint(joint, differentiable, tuple(needs_grad))


class StageProgram:
    """A tensor-parallel stage's lowered forward and backward for one input signature, called like the stage
    module: ``program(params, args)`` returns the stage's outputs (this rank's plain tensors, replicated),
    connected to autograd so that ``backward`` runs the lowered backward and accumulates each parameter's
    gradient (a GlobalTensor in its gradient layout) and each input's."""

    def __init__(
        self,
        module: nn.Module,
        layouts: Mapping[int, Placement],
        mesh: Mesh,
        args: Sequence[Any],
        partial: frozenset[int] = frozenset(),
        arena: bool | str = False,
        bucket_bytes: int = 4 * 2**20,
    ) -> None:
        needs_grad = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
        self.traced = trace_stage(module, args, needs_grad)
        self.params = list(dict(module.named_parameters()).values())
        self.buffers = list(dict(module.named_buffers()).values())
        self.mesh = mesh
        self.param_sbps: list[NdSbp] = [(layouts.get(id(p), B),) for p in self.params]
        tensor = [isinstance(a, torch.Tensor) for a in args]
        sbps: list[NdSbp | None] = [
            *self.param_sbps,
            *[(B,)] * len(self.buffers),
            *[(B,) if t else None for t in tensor],
            *[(B,)] * self.traced.joint.n_grads_in,
        ]
        # parameters in ``partial`` (by id) get their gradients as partial sums (P): the pipeline sums them over
        # micro-batches and reduces once per step; the others' leave the program in their gradient layout
        self.grad_sbps: list[NdSbp] = [
            (P,) if id(p) in partial else grad_sbp(sbp) for p, sbp in zip(self.params, self.param_sbps)
        ]
        self.program: Program = lower(
            self.traced.joint, mesh, world()[0], sbps, bucket_bytes, grad_sbps=list(self.grad_sbps), arena=arena
        )
        self.ran = False

    def __call__(self, args: Sequence[Any]) -> list[Any]:
        out = _Run.apply(self, len(self.params), *self.params, *args)
        return list(out) if isinstance(out, tuple) else [out]  # apply unpacks a 1-tuple

    # the lowered code, the first call of each checked (its shapes asserted against the layouts)
    def forward(self, args: Sequence[Any]) -> tuple[list[torch.Tensor], Any]:
        run = self.program.run if self.ran else self.program.checked
        locals_ = [p._local if isinstance(p, GlobalTensor) else p for p in self.params]
        return run([*locals_, *self.buffers, *args])  # type: ignore[return-value]

    def backward(self, saved: Any, grads_in: Sequence[torch.Tensor]) -> tuple[list[Any], list[Any]]:
        run = self.program.backward if self.ran else self.program.checked_backward
        assert run is not None
        self.ran = True
        grads, input_grads = run(saved, [g.contiguous() for g in grads_in])
        out: list[Any] = [None] * len(self.params)
        for k, g in zip(self.traced.joint.grad_of, grads):
            p = self.params[k]
            out[k] = wrap(g, self.mesh, self.grad_sbps[k], p.shape) if isinstance(p, GlobalTensor) else g
        return out, input_grads


class _Run(torch.autograd.Function):
    """One micro-batch through a stage program: parameters and inputs in, outputs out; backward by the
    program's backward."""

    @staticmethod
    def forward(ctx: Any, program: StageProgram, n_params: int, *tensors: Any) -> tuple[Any, ...]:  # type: ignore[override]
        args = tensors[n_params:]
        outs, saved = program.forward(args)
        ctx.program, ctx.saved, ctx.n_params, ctx.n_args = program, saved, n_params, len(args)
        ctx.mark_non_differentiable(
            *[o for i, o in enumerate(outs) if i not in program.traced.differentiable and isinstance(o, torch.Tensor)]
        )
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:  # type: ignore[override]
        program: StageProgram = ctx.program
        arriving = [grads[i] for i in program.traced.differentiable]
        param_grads, input_grads = program.backward(ctx.saved, arriving)
        ctx.saved = None
        it = iter(input_grads)
        inputs = [next(it) if need else None for need in program.traced.needs_grad]
        return (None, None, *param_grads, *inputs)
