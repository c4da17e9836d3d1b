"""Host-to-device copies of a step's inputs: each rank copies only its own shard, through a pinned buffer.

A compiled step takes the global batch as plain host tensors (the same on every rank, as the API promises). Each
rank slices its shard on the host first (a view; no bytes move), so on a GPU it copies 1/N of the batch, not
all of it. The copy goes through a page-locked buffer kept per input (allocated once, reused every step),
so ``non_blocking`` makes it asynchronous on the current stream, ordered before the step's kernels; an event
recorded after it keeps the next step from refilling the buffer while the copy may still read it (PyTorch's
DataLoader pins whole batches per step instead; here the buffer is part of the static plan). On a CPU mesh
the shard is copied once into storage of its own: a step never aliases the caller's batch (the program may
keep or update what it is given), and the memory plan counts the shard, not the whole batch behind a view.
"""

from __future__ import annotations

from typing import Any

import torch


class Staging:
    """Pinned buffers for the inputs of one compiled model, by input position."""

    def __init__(self) -> None:
        self.buffers: dict[int, tuple[torch.Tensor, Any]] = {}  # slot -> (pinned buffer, event after its copy)

    def to_device(self, slot: int, piece: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``piece`` (a host tensor) on ``device``: a copy of its own on a CPU, else copied through slot's
        pinned buffer."""
        if device.type == "cpu":
            return piece.clone(memory_format=torch.contiguous_format)
        if piece.device.type != "cpu":
            return piece.to(device)
        held = self.buffers.get(slot)
        if held is None or held[0].shape != piece.shape or held[0].dtype != piece.dtype:
            buffer = torch.empty(piece.shape, dtype=piece.dtype, pin_memory=True)
        else:
            buffer, copied = held
            copied.synchronize()  # the last step's copy out of this buffer has finished
        buffer.copy_(piece)
        out = buffer.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.buffers[slot] = (buffer, event)
        return out
