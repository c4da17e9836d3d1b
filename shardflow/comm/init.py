"""Start (or join) the job's default process group from torchrun's environment.

Every collective carries a timeout; gloo's own default (30 minutes) hides a dead peer for far too long,
so shardflow's default is 60 s: a stuck peer (SIGSTOP, a hung kernel) makes its peers' next collective
time out, they end, and the launcher SIGKILLs the stopped process at once instead of waiting out
torchrun's 30 s grace, so the whole job ends within two minutes. Pass ``sf.init(timeout=...)`` when a
rank legitimately works alone for longer between collectives (huge checkpoints on slow disks).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from shardflow.placement.mesh import ACTING

DEFAULT_TIMEOUT = timedelta(seconds=60)
_timeout = DEFAULT_TIMEOUT


def collective_timeout() -> timedelta:
    """The timeout every group of this job is created with (set by ``init``)."""
    return _timeout


def _as_timedelta(timeout: float | timedelta | None) -> timedelta:
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, timedelta):
        return timeout
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
    return timedelta(seconds=float(timeout))


def init(backend: str | None = None, timeout: float | timedelta | None = None) -> None:
    """Initialise torch.distributed from ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``.

    Idempotent: a second call (or a process group someone else started) is left as it is. Without a
    torchrun environment this starts a world of one process on a free local port. ``backend`` defaults to
    NCCL when CUDA is available and gloo otherwise.
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    global _timeout
    td = _timeout = _as_timedelta(timeout)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and attempt != "0":
            # NOTE: workers restarted by the elastic agent meet in the agent's store again, which still holds
            # the previous attempt's keys (the gloo addresses of dead workers): give each attempt its own prefix
            rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, False, timeout=td)
            prefixed = dist.PrefixStore(f"shardflow/attempt_{attempt}", agent)
            dist.init_process_group(backend, store=prefixed, rank=rank, world_size=size, timeout=td)
            return
        dist.init_process_group(backend, timeout=td)
        return
    store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=td)


def default_group() -> object | None:
    """The job's default process group object (a new one after destroy + init); None if unknown."""
    return getattr(getattr(dist.distributed_c10d, "_world", None), "default_pg", None)


_WORLD: list[Any] = [None, (0, 1)]  # (default process group, its (rank, size))


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when no process group is running.

    Eager ops ask on every call and ``dist.get_rank()`` costs microseconds, so the answer is kept for as
    long as the default process group is the same object."""
    acting = ACTING.get()  # pricing one rank of a virtual mesh (placement/mesh.py's acting_as)
    if acting is not None:
        return acting
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    pg = default_group()
    if pg is None or pg is not _WORLD[0]:
        _WORLD[0], _WORLD[1] = pg, (dist.get_rank(), dist.get_world_size())
    return _WORLD[1]  # type: ignore[no-any-return]
