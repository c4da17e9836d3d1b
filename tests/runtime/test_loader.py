"""``sf.Loader``: batches from real files, read and collated by actors ahead of the consumer, bounded by
their registers. The bounds are checked with counters, not clocks: the consumer holds each batch until it
has seen the reader start the next one (so reading runs while the step holds a batch), and the reader
never gets further ahead than the registers allow."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import shardflow as sf
from shardflow.runtime.actors import ActorError


class Files(torch.utils.data.Dataset):
    """One ``.npy`` file per sample (features and label), read from disk on every access."""

    def __init__(self, root: Path, n: int) -> None:
        rng = np.random.default_rng(0)
        for i in range(n):
            np.save(root / f"{i}.npy", rng.standard_normal(5).astype(np.float32))
        self.root, self.n = root, n
        self.started: list[int] = []  # indices whose read began, in order
        self.fail_at: int | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.started.append(i)
        if i == self.fail_at:
            raise OSError(f"sample {i} is unreadable")
        return torch.from_numpy(np.load(self.root / f"{i}.npy")), i % 3


def test_batches_equal_plain_reading(tmp_path: Path):
    data = Files(tmp_path, 10)
    got = list(sf.Loader(data, batch_size=4))
    assert [len(y) for _, y in got] == [4, 4, 2]
    want = torch.stack([torch.from_numpy(np.load(tmp_path / f"{i}.npy")) for i in range(10)])
    torch.testing.assert_close(torch.cat([x for x, _ in got]), want, rtol=0, atol=0)
    assert len(list(sf.Loader(data, batch_size=4, drop_last=True))) == 2
    batches = [(torch.ones(2), i) for i in range(3)]  # any iterable of whole batches
    assert [i for _, i in sf.Loader(batches)] == [0, 1, 2]


@pytest.mark.parametrize("registers, ahead", [(1, 1), (2, 3)])
def test_registers_bound_how_far_reading_runs_ahead(tmp_path: Path, registers: int, ahead: int):
    """Reader and collator have ``registers`` each; while the consumer holds batch j, the reader may have
    started batch j + 1 with one register each (the collator holds j + 1's samples), j + 3 with two."""
    data = Files(tmp_path, 16)
    loader = sf.Loader(data, batch_size=2, registers=registers)
    leads = []
    for j, (_, y) in enumerate(loader):
        assert y.tolist() == [(2 * j) % 3, (2 * j + 1) % 3]
        # hold the batch until reading has gone as far as the registers let it (or the data ends)
        target = min(j + ahead, 7)
        for _ in range(400):
            if len(data.started) >= 2 * (target + 1):
                break
            threading.Event().wait(0.005)
        threading.Event().wait(0.02)  # room to overstep, if the bound were wrong
        leads.append(len(data.started) // 2 - 1 - j)  # batches started beyond the one held
    assert max(leads) == ahead
    assert all(actor.out.most_taken <= registers for actor in loader.chain.actors)


def test_a_failing_read_names_the_actor_and_stops_the_chain(tmp_path: Path):
    data = Files(tmp_path, 8)
    data.fail_at = 5
    loader = sf.Loader(data, batch_size=2)
    with pytest.raises(ActorError, match="actor 'read' failed: OSError\\('sample 5 is unreadable'\\)"):
        for _ in loader:
            pass
    assert not any(a.thread.is_alive() for a in loader.chain.actors)


def test_breaking_out_stops_every_actor(tmp_path: Path):
    loader = sf.Loader(Files(tmp_path, 40), batch_size=2)
    for j, _ in enumerate(loader):
        if j == 1:
            break
    loader.close()
    assert not any(a.thread.is_alive() for a in loader.chain.actors)
    assert {e.track for e in loader.events} == {"read", "collate"}


class _Meeting(Files):
    """Reading samples 0 and 1 waits until both reads have begun: only readers working at once pass."""

    def __init__(self, root: Path, n: int) -> None:
        super().__init__(root, n)
        # a hang deadline only: with several readers both reads begin within milliseconds, even on loaded cores
        self.meet = threading.Barrier(2, timeout=60)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i in (0, 1):
            self.meet.wait()
        return super().__getitem__(i)


def _read_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sf-read")]


def test_readers_read_the_samples_of_a_batch_at_once(tmp_path: Path):
    data = _Meeting(tmp_path, 10)
    got = list(sf.Loader(data, batch_size=4, readers=3))
    want = torch.stack([torch.from_numpy(np.load(tmp_path / f"{i}.npy")) for i in range(10)])
    torch.testing.assert_close(torch.cat([x for x, _ in got]), want, rtol=0, atol=0)  # in index order
    assert [y.tolist() for _, y in got] == [[0, 1, 2, 0], [1, 2, 0, 1], [2, 0]]
    assert _read_threads() == []  # the pool ends with its chain
    one = _Meeting(tmp_path, 10)
    with pytest.raises(ActorError, match="actor 'read' failed: BrokenBarrierError"):
        one.meet = threading.Barrier(2, timeout=0.2)
        list(sf.Loader(one, batch_size=4))  # one reader: sample 0 waits for a read that never starts
    data = Files(tmp_path, 12)
    data.fail_at = 6
    with pytest.raises(ActorError, match="actor 'read' failed: OSError\\('sample 6 is unreadable'\\)"):
        list(sf.Loader(data, batch_size=4, readers=2))
    assert _read_threads() == []
    loader = sf.Loader(Files(tmp_path, 40), batch_size=2, readers=2)
    for j, _ in enumerate(loader):
        if j == 1:
            break
    loader.close()
    assert _read_threads() == [] and not any(a.thread.is_alive() for a in loader.chain.actors)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        sf.Loader([1], batch_size=0)
    with pytest.raises(ValueError, match="has no len\\(\\) and indexing"):
        sf.Loader(iter([1, 2]), batch_size=2)
    with pytest.raises(ValueError, match="registers must be a positive int .*got 0"):
        sf.Loader([1], registers=0)
    with pytest.raises(ValueError, match="readers must be a positive int .*got 0"):
        sf.Loader([1], batch_size=1, readers=0)
    with pytest.raises(ValueError, match="readers=2 reads the samples of a batch in parallel, which needs a Dataset"):
        sf.Loader([[1, 2]], readers=2)
