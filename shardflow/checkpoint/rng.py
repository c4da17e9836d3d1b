"""Every rank's random-number generator state, for snapshots: gathered at a save, each rank's own restored
at a load on as many ranks (a resharded job draws fresh streams: there is no rank to take them from)."""

from __future__ import annotations

import base64

import torch

from shardflow.comm.collectives import all_gather_single
from shardflow.comm.init import world


def rng_states() -> list[str]:
    """Every rank's CPU random-number generator state (base64), gathered to every rank (collective)."""
    mine = torch.get_rng_state()
    if not torch.distributed.is_initialized() or world()[1] == 1:
        return [base64.b64encode(mine.numpy().tobytes()).decode()]
    every = torch.zeros(world()[1] * mine.numel(), dtype=torch.uint8)
    all_gather_single(every, mine)
    return [base64.b64encode(row.numpy().tobytes()).decode() for row in every.view(world()[1], -1)]


def restore_rng(states: list[str] | None) -> None:
    """Give this rank the generator state it had when saved, when the job has as many ranks as then (a
    resharded job draws fresh streams: there is no rank to take them from)."""
    if states and len(states) == world()[1]:
        raw = base64.b64decode(states[world()[0]])
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
