"""The memory measurement itself (``shardflow.testing.memory``), on allocations whose peak is known: it is
the independent side of every memory prediction test, so it must count what the allocator did."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from shardflow.testing.memory import _MARK, profiled_peak, storage_addresses


def test_peak_counts_allocations_and_frees_by_address_after_the_mark():
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        # made before the mark (as the step before the measured one makes them): the profiler records
        # frees only of blocks allocated while it runs
        old = torch.empty(4096, dtype=torch.uint8)  # held at the step's start (the caller's base), freed in it
        noise = torch.empty(10_000, dtype=torch.uint8)  # not counted by the caller, freed in the step
        held = storage_addresses([old])
        mark = torch.empty(_MARK, dtype=torch.uint8)
        del mark
        a = torch.empty(1000, dtype=torch.uint8)
        b = torch.empty(3000, dtype=torch.uint8)
        del a
        del old  # 4096 bytes counted in the caller's base come back
        c = torch.empty(2500, dtype=torch.uint8)  # 3000 + 2500 - 4096 < 1000 + 3000
        del b, c, noise  # the noise's free is not this step's: it does not go below the start
    assert profiled_peak(prof, marked=True, held=held) == 4000
    assert profiled_peak(prof, marked=True) == 5500  # without the held addresses the free is not ours
