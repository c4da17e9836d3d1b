"""The joint graph: a training step's forward *and* backward as one ATen graph on fake tensors.

``make_fx`` traces the unmodified model's forward and ``torch.autograd.grad`` (AOTAutograd's way to a
joint graph; ``torch.export`` has no stable joint API), so the graph holds the below-autograd ATen ops that
eager GlobalTensors see, backward included, and no autograd runs per step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx

from shardflow.graph.values import module_paths, recomputations, value_keys
from shardflow.runtime.capture_errors import explained


@dataclass(frozen=True)
class Joint:
    """A traced training step: ``graph(params, buffers, inputs) -> [loss, *grads]``; or a pipeline stage's
    forward and backward: ``graph(params, buffers, inputs, grads_in) -> [*outputs, *grads, *input_grads]``
    (``graph/stage_program.py``), lowered to a forward and a backward function with what the forward saves
    for the backward handed between them."""

    graph: fx.GraphModule
    n_params: int
    n_buffers: int
    grad_of: tuple[int, ...]  # the parameter index of each gradient output (unused parameters get none)
    n_values: int = 1  # forward results first: the loss, or a stage's outputs
    n_grads_in: int = 0  # a stage: the gradients arriving for its outputs, its last placeholders
    n_input_grads: int = 0  # a stage (or a step with ``input_grad_of``): gradients of inputs, last in the results
    input_grad_of: tuple[int, ...] = ()  # a training step: the inputs (by position) whose gradients it returns
    forward_only: bool = False  # an evaluation: ``graph(params, buffers, inputs) -> [*outputs]``, no backward


class _Joint(nn.Module):
    """``forward(inputs, names)``: the model's loss and its gradients with respect to the named parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, inputs: tuple[Any, ...], names: list[str], xs: Sequence[torch.Tensor] = ()
    ) -> list[torch.Tensor | None]:
        loss = self.model(*inputs)
        leaves: list[torch.Tensor] = [functools.reduce(getattr, n.split("."), self.model) for n in names]  # type: ignore[misc]
        return [loss, *torch.autograd.grad(loss, [*leaves, *xs], allow_unused=True)]


def trace_step(model: nn.Module, inputs: Sequence[Any], device: str = "cpu", input_grads: Sequence[int] = ()) -> Joint:
    """Trace forward + backward of ``model(*inputs)`` (a scalar loss) with respect to its parameters, and
    to the inputs at positions ``input_grads`` (their gradients last; zeros where the loss ignores one:
    the pooled vectors of sparse tables, whose gradients leave the program for the tables' exchange).

    Parameters, buffers and tensor inputs are replaced by fake tensors of their global shapes (no memory),
    so ``model`` may hold GlobalTensors or real tensors alike; tied parameters stay tied.
    """
    named = dict(model.named_parameters())
    bnamed = dict(model.named_buffers())
    names, bnames = list(named), list(bnamed)
    grad_of: list[int] = []

    def step(ps: list[torch.Tensor], bs: list[torch.Tensor], xs: list[Any]) -> list[torch.Tensor]:
        leaves = [p.detach().requires_grad_(q.requires_grad) for p, q in zip(ps, named.values())]
        wanted = [i for i, p in enumerate(leaves) if p.requires_grad]
        xs = [x.detach().requires_grad_(True) if i in input_grads else x for i, x in enumerate(xs)]
        # NOTE: backward runs inside functional_call too: a block under activation checkpointing runs its
        # forward again during backward, and must see the traced parameters then, not the module's own.
        grads = functional_call(
            _Joint(model),
            {**{"model." + n: t for n, t in zip(names, leaves)}, **{"model." + n: b for n, b in zip(bnames, bs)}},
            (tuple(xs), [names[i] for i in wanted], [xs[i] for i in input_grads]),
        )
        loss, grads = grads[0], grads[1:]
        xgrads = [torch.zeros_like(xs[i]) if g is None else g for i, g in zip(input_grads, grads[len(wanted) :])]
        grads = grads[: len(wanted)]
        grad_of[:] = [i for i, g in zip(wanted, grads) if g is not None]
        return [loss.detach(), *[g for g in grads if g is not None], *xgrads]

    ps, bs, xs = fake_arguments(model, inputs, device)
    stage = f"tracing {type(model).__name__}'s forward and backward on fake tensors"
    with attention_kernels(device), explained(model, stage), module_paths(model), recomputations():
        graph = make_fx(step, tracing_mode="fake")(ps, bs, xs)
    value_keys(graph.graph)
    return Joint(
        graph, len(ps), len(bs), tuple(grad_of), n_input_grads=len(input_grads), input_grad_of=tuple(input_grads)
    )


class FakeArguments(NamedTuple):
    """A traced function's arguments: fake tensors of the global shapes of the parameters, buffers, inputs."""

    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    inputs: list[Any]


def fake_arguments(model: nn.Module, inputs: Sequence[Any], device: str) -> FakeArguments:
    """Fake tensors (no memory) of ``model``'s parameters and buffers and of the tensor ``inputs``."""
    with FakeTensorMode(allow_non_fake_inputs=True):

        def fake(t: torch.Tensor) -> torch.Tensor:
            return torch.empty(tuple(t.shape), dtype=t.dtype, device=device)

        return FakeArguments(
            [fake(p) for p in model.parameters()],
            [fake(b) for b in model.buffers()],
            [fake(x) if isinstance(x, torch.Tensor) else x for x in inputs],
        )


def attention_kernels(device: str) -> Any:
    """On CUDA, attention traces to the flash kernel (half precision), the memory-efficient one (any float
    dtype) or plain matmuls and softmax, in torch's order of preference: kernels ops/rules/attention.py has layout
    rules for; not to cuDNN's (its outputs differ by version)."""
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
