"""Custom ops and Functions the tests share. A ``torch.library`` custom op with a registered backward, as
fused kernels are shipped: ``scaled(x, w)``
is ``x * w`` (``w`` broadcast over rows), its backward ``(scaled(g, w), (g * x).sum(0))``, counted in
``BACKWARDS`` (a backward that runs twice would count, or accumulate into a buffer, twice). Shared by the
tests so it is registered once per process (spawned ranks import it with the test module). And a custom
``autograd.Function``, a straight-through estimator (rounding forward, identity backward, as quantization-aware
training uses), in a model whose gradient is wrong if anything drops that backward."""

from __future__ import annotations

from typing import Any

import torch


@torch.library.custom_op("shardflow_test::scaled", mutates_args=())
def scaled(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * w


@scaled.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


BACKWARDS = [0]


def _backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    BACKWARDS[0] += 1
    x, w = ctx.saved_tensors
    return scaled(g, w), (g * x).sum(0)


scaled.register_autograd(_backward, setup_context=_setup)


class StraightThrough(torch.autograd.Function):
    """Rounding to quarters in forward, the identity in backward (rounding's own derivative is zero)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


class Quantized(torch.nn.Module):
    """``Linear(6, 16)``, the estimator, ``Linear(16, 5)``; returns the cross entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = torch.nn.Linear(6, 16), torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.head(StraightThrough.apply(self.a(x))), y)
