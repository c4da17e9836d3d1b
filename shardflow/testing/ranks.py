"""Multi-process test harness: run a module-level function on N gloo ranks and collect the results.

Decision: ranks are long-lived "spawn" workers pooled per world size (one pool alive at a time) and any
failure kills the pool. Reason: starting N processes and a process group costs seconds, and a
pool that saw an exception may hold half-finished collectives, so it is rebuilt rather than repaired.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import inspect
import itertools
import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["RankError", "RankTimeoutError", "run_on_ranks", "shutdown_pools", "with_ranks"]

F = TypeVar("F", bound=Callable[..., Any])

# Set in worker processes only; `with_ranks` wrappers read it to decide between dispatching and running.
_IN_WORKER = False
_RANK: int | None = None

_PG_TIMEOUT = timedelta(seconds=60)  # every gloo collective fails after this, so a stuck rank never hangs forever
_START_TIMEOUT_S = 120.0  # spawning N ranks that each import torch is slow on a small machine
_GRACE_S = 3.0  # after the first rank error, how long the others get before the pool is killed
_POLL_S = 1.0  # workers poll their task queue (and their parent) this often
_STOP_JOIN_S = 10.0  # clean shutdown: how long to wait for destroy_process_group() and exit
_REPO_ROOT = str(Path(__file__).resolve().parents[2])

_Task = tuple[int, str, str, bytes]  # (task id, fn module, fn qualname, pickled (args, kwargs))
_Reply = tuple[int, int, bool, Any]  # (task id, rank, ok, pickled value | traceback text)
_READY = -1  # task id of the reply a worker sends once its process group is up


class RankError(RuntimeError):
    """One or more ranks raised, died or did not answer; the message names them and quotes their traceback."""


class RankTimeoutError(RankError, TimeoutError):
    """Some ranks did not answer within the timeout given to `run_on_ranks`."""


# --------------------------------------------------------------------------------------------- worker side


def _watch_parent(parent_pid: int) -> None:
    # NOTE: the task loop also checks the parent, but a rank stuck in a user function never gets back to
    # the loop; this thread makes sure an orphaned rank exits anyway.
    while True:
        time.sleep(_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(3)


def _resolve(module: str, qualname: str) -> Callable[..., Any]:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def _worker_main(
    rank: int,
    world_size: int,
    port: int,
    sys_path: list[str],
    parent_pid: int,
    tasks: Any,
    replies: Any,
) -> None:
    global _IN_WORKER, _RANK
    _IN_WORKER, _RANK = True, rank
    sys.path[:] = sys_path
    torch.set_num_threads(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            init_method=f"tcp://127.0.0.1:{port}",
            timeout=_PG_TIMEOUT,
        )
    except Exception:  # noqa: BLE001 -- sent to the parent, which names this rank in its RankError
        replies.put((_READY, rank, False, traceback.format_exc()))
        return
    replies.put((_READY, rank, True, None))
    try:
        while os.getppid() == parent_pid:
            try:
                task: _Task | None = tasks.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if task is None:
                break
            task_id, module, qualname, payload = task
            try:
                args, kwargs = pickle.loads(payload)
                value = _resolve(module, qualname)(*args, **kwargs)
                reply: _Reply = (task_id, rank, True, pickle.dumps(value))
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # noqa: BLE001 -- pytest.fail/skip are BaseExceptions; report them too
                reply = (task_id, rank, False, traceback.format_exc())
            replies.put(reply)
    finally:
        if dist.is_initialized():  # a task may have destroyed it already
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- parent side


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _format_ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


class _Pool:
    """N spawned ranks sharing one gloo process group; one task queue per rank, one reply queue."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.replies = ctx.Queue()
        self._task_ids = itertools.count()
        sys_path = list(sys.path)
        if _REPO_ROOT not in sys_path:
            sys_path.insert(0, _REPO_ROOT)
        port = _free_port()
        self.processes: list[BaseProcess] = [
            ctx.Process(
                target=_worker_main,
                args=(rank, world_size, port, sys_path, os.getpid(), self.tasks[rank], self.replies),
                name=f"shardflow-rank{rank}-of-{world_size}",
                daemon=True,
            )
            for rank in range(world_size)
        ]
        try:
            for proc in self.processes:
                proc.start()
            self._collect(_READY, "start the process group", _START_TIMEOUT_S)
        except BaseException:
            self.kill()
            raise

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.processes if proc.pid is not None]

    def run(self, module: str, qualname: str, payload: bytes, timeout: float) -> list[Any]:
        task_id = next(self._task_ids)
        for q in self.tasks:
            q.put((task_id, module, qualname, payload))
        values = self._collect(task_id, f"run {module}.{qualname}", timeout)
        return [pickle.loads(v) for v in values]

    def _collect(self, task_id: int, what: str, timeout: float) -> list[Any]:
        """Wait for one reply per rank; raise RankError naming the failed or silent ranks."""
        values: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(values) + len(failures) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                reply_id, rank, ok, body = self.replies.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                for rank, proc in enumerate(self.processes):
                    if rank not in values and rank not in failures and proc.exitcode is not None:
                        failures[rank] = f"process exited with code {proc.exitcode} (its stderr says why)\n"
                        deadline = min(deadline, time.monotonic() + _GRACE_S)
                continue
            if reply_id != task_id:
                continue  # cannot happen while every failure kills the pool; ignore rather than misattribute
            if ok:
                values[rank] = body
            else:
                failures[rank] = body
                deadline = min(deadline, time.monotonic() + _GRACE_S)
        if len(values) == self.world_size:
            return [values[r] for r in range(self.world_size)]
        silent = [r for r in range(self.world_size) if r not in values and r not in failures]
        if not failures:
            raise RankTimeoutError(
                f"{_format_ranks(silent)} of {self.world_size} did not answer within {timeout:g} s "
                f"trying to {what}; the pool was killed and is rebuilt on next use"
            )
        lines = [
            f"{_format_ranks(sorted(failures))} of {self.world_size} failed to {what}; "
            "the pool was killed and is rebuilt on next use"
        ]
        if silent:
            lines.append(
                f"{_format_ranks(silent)} did not answer within {_GRACE_S:g} s after the first failure "
                "(probably blocked in a collective)"
            )
        lines.extend(f"--- rank {rank} ---\n{failures[rank].rstrip()}" for rank in sorted(failures))
        raise RankError("\n".join(lines))

    def stop(self) -> None:
        """Ask every rank to leave the process group and exit; escalate to terminate/kill if needed."""
        for q in self.tasks:
            q.put(None)
        deadline = time.monotonic() + _STOP_JOIN_S
        for proc in self.processes:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        started = [proc for proc in self.processes if proc.pid is not None]
        for proc in started:
            if proc.is_alive():
                proc.terminate()
        for proc in started:
            proc.join(timeout=1.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for q in [*self.tasks, self.replies]:
            q.cancel_join_thread()  # a dead reader must not block interpreter exit
            q.close()


_POOL: _Pool | None = None
_POOL_LOCK = threading.RLock()


def _pool(world_size: int) -> _Pool:
    global _POOL
    if _POOL is not None and _POOL.world_size != world_size:
        shutdown_pools()  # one pool at a time: two would oversubscribe a small CI machine
    if _POOL is None:
        try:
            _POOL = _Pool(world_size)
        except RankError:
            # NOTE: the port is picked free in the parent and bound by rank 0 later; another process may
            # take it in between. One retry on a fresh port makes that race harmless.
            _POOL = _Pool(world_size)
    return _POOL


def _address(fn: Callable[..., Any]) -> tuple[str, str]:
    """Where ranks import `fn` from: the module and qualified name it was defined under.

    NOTE: decorators may return wrappers named after their own internals (hypothesis's `@given` gives
    `accept.<locals>.test_x`); the innermost function, found through `__wrapped__` or hypothesis's
    documented `.hypothesis.inner_test`, holds the real definition site, and the module attribute there
    is the fully decorated object.
    """
    inner = inspect.unwrap(fn)
    while (test := getattr(getattr(inner, "hypothesis", None), "inner_test", None)) is not None:
        inner = inspect.unwrap(test)
    module, qualname = inner.__module__, inner.__qualname__
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(
            f"{module}.{qualname} cannot be imported by the ranks; define it at module level "
            "(ranks import the function by its module and qualified name)"
        )
    return module, qualname


def run_on_ranks(n: int, fn: Callable[..., Any], /, *args: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
    """Run module-level `fn(*args, **kwargs)` on each of `n` gloo ranks; return the values indexed by rank.

    Raises RankError if any rank raises or dies (RankTimeoutError if some rank is silent past `timeout`);
    the pool is then killed and rebuilt on the next call. Args and return values must be picklable.
    """
    if _IN_WORKER:
        raise RuntimeError(f"run_on_ranks() called inside rank {_RANK}; ranks cannot start nested pools")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"world size must be a positive int, got {n!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    module, qualname = _address(fn)
    try:
        payload = pickle.dumps((args, kwargs))
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise TypeError(f"arguments for {module}.{qualname} must be picklable to reach the ranks: {exc}") from exc
    global _POOL
    with _POOL_LOCK:
        pool = _pool(n)
        try:
            return pool.run(module, qualname, payload, timeout)
        except BaseException:
            # NOTE: any failure (a rank error, a timeout, Ctrl-C in the parent) may leave collectives half
            # done, so the process group can no longer be trusted: kill it and start fresh next time.
            pool.kill()
            _POOL = None
            raise


def with_ranks(n: int, timeout: float = 120.0) -> Callable[[F], F]:
    """Decorate a module-level pytest test so that its body runs on each of `n` gloo ranks.

    In the parent the test dispatches itself to the pool; the ranks import the same decorated object by
    name and, seeing `_IN_WORKER`, run the original body. Parametrized args must be picklable. Put it
    outermost (pytest marks may go above it); under `@given`, derandomise so every rank draws alike.
    """

    def decorate(fn: F) -> F:
        _address(fn)  # fail at import time, not on the ranks, if they could not find the test

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _IN_WORKER:
                return fn(*args, **kwargs)
            run_on_ranks(n, fn, *args, timeout=timeout, **kwargs)
            return None  # pytest warns when a test returns a value

        return wrapper  # type: ignore[return-value]

    return decorate


def shutdown_pools() -> None:
    """Stop the live pool, if any: ranks destroy their process group and exit (killed if they do not)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            pool, _POOL = _POOL, None
            pool.stop()


atexit.register(shutdown_pools)
