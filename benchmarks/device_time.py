"""A stand-in for an accelerator's kernel: an op that takes a fixed time without holding a CPU core.

On a GPU, a stage's compute runs on the device while the host thread that launched it is free to send, receive
and read; on this machine's 2 cores, a CPU stage's compute takes the core its neighbour's messages and reads
need. ``device_time(x, ms, backward_ms)`` returns a copy of ``x`` after sleeping ``ms`` milliseconds (the
thread waits with the GIL released, as a host thread waits on a CUDA event); its backward sleeps
``backward_ms``. ``DeviceLinear`` spends a linear layer's three products that way. It is a ``torch.library``
custom op with a fake kernel and a registered backward, so torch.export, shardflow's stage cut and
torch.distributed.pipelining all keep it as one call. Benchmarks that use it say so in their tables: the
figures measure the runtime's scheduling and overlap with compute that does not contend for the host, not this
machine's arithmetic.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@torch.library.custom_op("shardflow_bench::device_time", mutates_args=())
def device_time(x: torch.Tensor, ms: float, backward_ms: float = 0.0) -> torch.Tensor:
    """A copy of ``x`` after ``ms`` milliseconds; its backward takes ``backward_ms``."""
    if ms > 0:
        time.sleep(ms / 1e3)
    return x.clone()


@device_time.register_fake
def _(x: torch.Tensor, ms: float, backward_ms: float = 0.0) -> torch.Tensor:
    return torch.empty_like(x)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.backward_ms = inputs[2]


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    return device_time(grad, ctx.backward_ms), None, None


device_time.register_autograd(_backward, setup_context=_setup)


class DeviceLinear(nn.Linear):
    """``nn.Linear`` as a device would run it: ``ms`` forward, ``ms`` for the input's gradient and ``ms``
    for the weight's (the three matrix products of a linear layer take about the same time). The weight's
    share sits on the weight's own path, so a backward split in two passes (``runtime/split_backward.py``)
    spends it in the weights' pass, as it would a real weight-gradient kernel."""

    def __init__(self, width: int, out: int, ms: float) -> None:
        super().__init__(width, out)
        self.ms = ms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = device_time(self.weight, self.ms, self.ms)  # the forward's time; the weight gradient's
        return device_time(F.linear(x, weight, self.bias), 0.0, self.ms)  # the input gradient's time
