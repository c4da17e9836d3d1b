"""A ``torch.library`` custom op with a registered backward, as fused kernels are shipped: ``scaled(x, w)``
is ``x * w`` (``w`` broadcast over rows), its backward ``(scaled(g, w), (g * x).sum(0))``, counted in
``BACKWARDS`` (a backward that runs twice would count, or accumulate into a buffer, twice). Shared by the
tests so it is registered once per process (spawned ranks import it with the test module)."""

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
