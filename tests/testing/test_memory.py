"""The memory measurement itself (``shardflow.testing.memory``), on allocations whose peak is known: it is
the independent side of every memory prediction test, so it must count what the allocator did, on every
thread, whoever frees the block and whatever address the allocator hands out again."""

from __future__ import annotations

import threading

import torch

from shardflow.testing.memory import Record, peak_of, track_allocations, windows


def _on_thread(fn) -> None:  # type: ignore[no-untyped-def]
    t = threading.Thread(target=fn)
    t.start()
    t.join()


def test_peak_counts_every_thread_and_frees_made_elsewhere():
    old = torch.empty(50_000, dtype=torch.uint8)  # allocated before tracking: its free is not counted
    box: list[torch.Tensor] = []
    with track_allocations() as trace:
        held = torch.empty(4096, dtype=torch.uint8)
        trace.mark()
        _on_thread(lambda: box.append(torch.empty(100_000, dtype=torch.uint8)))  # allocated on another thread
        box.append(torch.empty(30_000, dtype=torch.uint8))  # 4096 + 100_000 + 30_000 alive: the peak
        del box[0]  # freed here, on the main thread
        del old  # not ours: the running count must not go below what it was
        _on_thread(box.clear)  # the last reference to the 30_000 block dropped on another thread
        _on_thread(lambda: torch.empty(20_000, dtype=torch.uint8))  # allocated and freed there
        b = torch.empty(120_000, dtype=torch.uint8)  # below the peak only if a's free was counted
        del b
        trace.mark()
        del held
    window = trace.window(0, 1)
    assert window.held == 4096
    assert window.peak == 4096 + 100_000 + 30_000


def test_a_step_that_frees_what_it_held_and_reuses_addresses():
    # records as the allocator gives them: address 1 freed unrecorded and handed out again
    mark0, mark1 = 777_781, 777_783
    records = [
        Record(1, 5000),  # held when the window starts
        Record(9, mark0),
        Record(9, 0),
        Record(2, 3000),
        Record(1, 0),  # the held block freed in the window
        Record(3, 1000),  # 5000 + 3000 - 5000 + 1000
        Record(3, 6000),  # the same address again: the 1000 block was freed by then
        Record(77, 0),  # a block from before tracking: ignored
        Record(9, mark1),
    ]
    got = windows(records, marks=2)
    assert got[(0, 1)].held == 5000 and got[(0, 1)].peak == 9000
    records[6] = Record(4, 6000)  # a new address: both blocks alive
    assert windows(records, marks=2)[(0, 1)].peak == 10_000


def test_peak_of_a_step_on_many_threads_at_once():
    barrier = threading.Barrier(4)
    kept: list[torch.Tensor] = []

    def work() -> None:
        t = torch.empty(64_000, dtype=torch.uint8)
        barrier.wait()  # all four blocks are alive together here
        kept.append(t[:1])
        del t

    def step() -> None:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        kept.clear()

    assert peak_of(step) == 4 * 64_000
