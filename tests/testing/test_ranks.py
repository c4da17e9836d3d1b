"""Tests for the pooled multi-process harness. They start real gloo ranks (seconds each on 2 cores), so the
order below is chosen to build as few pools as possible: 4 ranks, rebuilt after the error test, then 2, 4.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from shardflow.testing import RankError, RankTimeoutError, run_on_ranks, with_ranks
from shardflow.testing import ranks as ranks_mod

# ---------------------------------------------------------------------------- functions the ranks import


def _whoami() -> tuple[int, int, int | None, bool, int, int]:
    return (
        dist.get_rank(),
        dist.get_world_size(),
        ranks_mod._RANK,
        ranks_mod._IN_WORKER,
        os.getpid(),
        torch.get_num_threads(),
    )


def _rank_and_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _all_reduce_sum(base: torch.Tensor) -> torch.Tensor:
    t = base * (dist.get_rank() + 1)
    dist.all_reduce(t)
    return t


def _raise_on_rank_2(message: str) -> None:
    if dist.get_rank() == 2:
        raise ValueError(message)
    dist.barrier()  # the others block in a collective that rank 2 never joins


def _sleep_on_rank(rank: int, seconds: float) -> int:
    if dist.get_rank() == rank:
        time.sleep(seconds)
    return dist.get_rank()


@with_ranks(4)
def _touch(directory: Path, tag: str) -> None:
    (directory / f"{tag}-{dist.get_rank()}-of-{dist.get_world_size()}").touch()


def _live_pool() -> ranks_mod._Pool:
    pool = ranks_mod._POOL
    assert pool is not None
    return pool


def _assert_all_dead(pool: ranks_mod._Pool) -> None:
    for proc in pool.processes:
        assert proc.exitcode is not None, f"{proc.name} (pid {proc.pid}) is still running"
        assert proc.pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(proc.pid, 0)


# ---------------------------------------------------------------------------- checks without ranks


def test_rejects_functions_the_ranks_cannot_import() -> None:
    def local() -> None:
        pass

    with pytest.raises(ValueError, match="define it at module level"):
        run_on_ranks(4, local)
    with pytest.raises(ValueError, match=r"test_ranks\.test_rejects_.*<locals>\.local cannot be imported"):
        with_ranks(4)(local)


def test_rejects_unpicklable_args() -> None:
    with pytest.raises(TypeError, match="must be picklable"):
        run_on_ranks(4, _rank_and_world, lambda: None)


# ---------------------------------------------------------------------------- 4-rank pool


def test_ranks_see_their_rank_and_world_size() -> None:
    out = run_on_ranks(4, _whoami)
    assert [o[:4] for o in out] == [(r, 4, r, True) for r in range(4)]
    pids = {o[4] for o in out}
    assert len(pids) == 4
    assert os.getpid() not in pids
    assert [o[5] for o in out] == [1, 1, 1, 1]
    assert not ranks_mod._IN_WORKER  # the parent stays a parent


def test_all_reduce_sums_on_every_rank() -> None:
    base = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    expected = base * sum(r + 1 for r in range(4))  # computed here, in the parent
    out = run_on_ranks(4, _all_reduce_sum, base)
    assert len(out) == 4
    for t in out:
        torch.testing.assert_close(t, expected, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1.0, -2.5])
@with_ranks(4)
def test_with_ranks_body_runs_on_every_rank(scale: float) -> None:
    assert dist.get_world_size() == 4  # raises in the parent: no process group there
    t = torch.full((3,), scale * (dist.get_rank() + 1))
    dist.all_reduce(t)
    torch.testing.assert_close(t, torch.full((3,), scale * 10.0), rtol=0, atol=0)


@with_ranks(4)
# named here, not inherited: the ranks do not load tests/conftest.py's profile, and every rank must draw alike
@settings(derandomize=True, database=None, max_examples=5, deadline=None)
@given(st.integers(min_value=0, max_value=5))
def test_with_ranks_runs_hypothesis_on_every_rank(size: int) -> None:
    t = torch.ones(size)
    dist.all_reduce(t)  # deadlocks or mismatches if ranks drew different sizes
    torch.testing.assert_close(t, torch.full((size,), 4.0), rtol=0, atol=0)


@pytest.mark.parametrize("tag", ["a", "b"])
def test_with_ranks_passes_args_and_runs_once_per_rank(tmp_path: Path, tag: str) -> None:
    assert _touch(tmp_path, tag) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{tag}-{r}-of-4" for r in range(4)]


def test_error_on_one_rank_names_it_and_the_pool_is_rebuilt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ranks_mod, "_GRACE_S", 1.0)  # the others are stuck in a barrier; do not wait 3 s
    run_on_ranks(4, _rank_and_world)
    old = _live_pool()
    with pytest.raises(RankError) as info:
        run_on_ranks(4, _raise_on_rank_2, "boom from the test")
    message = str(info.value)
    assert message.startswith("rank 2 of 4 failed to run")
    assert "ValueError: boom from the test" in message
    assert "_raise_on_rank_2" in message  # the remote traceback, not just the exception text
    assert "ranks 0, 1, 3 did not answer within 1 s after the first failure" in message
    assert not isinstance(info.value, TimeoutError)
    assert ranks_mod._POOL is None
    _assert_all_dead(old)

    assert run_on_ranks(4, _rank_and_world) == [(r, 4) for r in range(4)]
    assert set(_live_pool().pids).isdisjoint(old.pids)


def test_silent_rank_times_out_and_the_pool_is_killed() -> None:
    run_on_ranks(4, _rank_and_world)
    old = _live_pool()
    start = time.monotonic()
    with pytest.raises(RankTimeoutError, match=r"^rank 1 of 4 did not answer within 3 s") as info:
        run_on_ranks(4, _sleep_on_rank, 1, 300.0, timeout=3)
    # a hang deadline, not a timing: rank 1 sleeps 300 s, so an answer within 60 s (20x the 3 s timeout) means
    # the harness gave up on it instead of waiting for it
    assert time.monotonic() - start < 60
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, RankError)
    assert ranks_mod._POOL is None
    _assert_all_dead(old)


# ---------------------------------------------------------------------------- switching sizes


def test_pools_of_two_sizes_one_after_the_other() -> None:
    assert run_on_ranks(2, _rank_and_world) == [(0, 2), (1, 2)]
    two = _live_pool()
    out = run_on_ranks(4, _all_reduce_sum, torch.ones(2))
    for t in out:
        torch.testing.assert_close(t, torch.full((2,), 10.0), rtol=0, atol=0)
    assert _live_pool().world_size == 4
    _assert_all_dead(two)  # one pool at a time
    assert [p.exitcode for p in two.processes] == [0, 0]  # stopped cleanly, not killed
