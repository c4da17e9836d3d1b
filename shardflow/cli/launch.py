"""Start N local worker processes with torchrun's own machinery and report how they ended.

Decision: workers are started by ``torch.distributed.launcher.api.elastic_launch`` (what ``torchrun`` runs),
with a c10d rendezvous on 127.0.0.1, so a worker sees exactly torchrun's environment (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ...) and ``sf.init()`` needs no second code path. By default
(``max_restarts=0``) a failed rank fails the job (BSP), and the agent stops the other ranks at once instead of
letting them wait on a dead peer until the collective timeout; with ``max_restarts=N`` the agent restarts
every rank up to N times and the job resumes itself (``shardflow train`` from its newest snapshot; each
attempt meets in its own prefix of the agent's store, see comm/init.py).

The target is ``"package.module:function"`` (called with no arguments, like a console script) or a path to a
``.py`` script (run as ``__main__``); either way the worker sees ``sys.argv == [target, *args]``. A worker
returns an exit code: a function's ``int`` result (``None`` is 0) or a script's ``SystemExit`` code.
"""

from __future__ import annotations

import faulthandler
import glob
import hashlib
import importlib
import json
import os
import re
import runpy
import signal
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

_WATCH_S = 1.0  # how often a worker checks that its launcher is still alive


def _watch_parent(parent_pid: int) -> None:
    # NOTE: the elastic agent stops workers when one fails or when it gets a signal, but a launcher killed
    # with SIGKILL cannot; this thread makes an orphaned worker exit instead of waiting on dead peers.
    while True:
        time.sleep(_WATCH_S)
        if os.getppid() != parent_pid:
            os._exit(3)


def _threads_per_worker(nprocs: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, nprocs))


def _load(target: str) -> Any:
    """The callable behind ``"module:function"`` (dotted attributes allowed after the colon)."""
    module, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target!r} names a {type(obj).__name__}, not a function")
    return obj


def _exit_code(value: object) -> int:
    """The process exit code for a function's result or a ``SystemExit`` code, like the interpreter's."""
    if value is None or value is True:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)  # sys.exit("message") prints the message and exits with 1
    return 1


def _name_process(rank: str) -> None:
    """``ps``/``top`` show a worker as ``sf-rank<N>`` (Linux ``prctl(PR_SET_NAME)``): which process is
    which rank matters when one hangs. Best effort elsewhere."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, f"sf-rank{rank}".encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _workers(parent: int) -> dict[int, str]:
    """This launcher's worker processes (named ``sf-rank<N>``) and their states (``R``, ``S``, ``T``, ``Z``...)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            comm = open(f"/proc/{entry}/comm").read().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and comm.startswith("sf-rank"):
            out[int(entry)] = fields[0]
    return out


def _kill_stopped_workers(parent: int, done: threading.Event) -> None:
    """Once a worker has ended while others run, SIGKILL the stopped ones (SIGSTOP, a debugger).

    When a rank fails, the agent asks the others to end with SIGTERM and waits 30 s before SIGKILL; a stopped
    process cannot act on SIGTERM, so a stuck (stopped) rank would hold the job for that whole grace. Its peers
    have already given up on it (their collectives timed out), so nothing is lost by ending it at once.
    """
    seen: set[int] = set()
    while not done.wait(0.5):
        if not os.path.isdir("/proc"):
            return
        states = _workers(parent)
        alive = {pid for pid, state in states.items() if state != "Z"}
        seen |= set(states)
        if seen - alive:  # some worker has ended: the job is ending
            for pid, state in states.items():
                if state in ("T", "t"):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass


def _worker(target: str, args: list[str], parent_pid: int) -> int:
    """Runs in every worker process (spawned by the elastic agent, torchrun's env vars already set)."""
    import torch

    _name_process(os.environ.get("RANK", "?"))
    # ``kill -USR1 <pid>`` prints every thread's stack to stderr: what a stuck rank is doing
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    # Intra-op threads of N ranks on few cores fight each other; give each rank its share of the cores.
    torch.set_num_threads(_threads_per_worker(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    sys.argv = [target, *args]
    try:
        if _is_script(target):
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
            code = 0
        else:
            code = _exit_code(_load(target)())
    except SystemExit as e:
        code = _exit_code(e.code)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _is_script(target: str) -> bool:
    return target.endswith(".py") or os.path.isfile(target)


def _check_target(target: str) -> None:
    """Fail in the launcher, with one message, instead of in every worker."""
    if _is_script(target):
        if not os.path.isfile(target):
            raise ValueError(f"script {target!r} does not exist")
        return
    module, colon, qualname = target.partition(":")
    if not colon or not module or not qualname:
        raise ValueError(f"target {target!r} must be 'package.module:function' or a path to a .py script")


# the line an exception's text starts with: its class name (dotted or not), a colon, the message
_EXCEPTION_LINE = re.compile(r"(?:\w+\.)*[A-Z]\w*: \S")


def _failure_reason(message: object) -> str:
    """One line from an elastic ``ProcessFailure.message`` (a string, or a dict written by ``@record``): the
    last exception's first line, else the last line. An exception's text may run on over several lines (a
    MemoryPlanError's ends with the changes it priced), and its last line alone does not say what failed."""
    if isinstance(message, dict):
        message = message.get("message", message)
    lines = str(message).strip().splitlines()
    if not lines:
        return "unknown error"
    return next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), lines[-1])


# A rank that fails because a peer died reports a communication error; the peer's own error is the cause.
_SECONDARY = (
    "Connection closed by peer",
    "Connection reset",
    "Timed out",
    "Application timeout caused pair closure",  # gloo, on a pair whose other operation timed out
    "Broken pipe",
    "SIGTERM",
)


def _failure_report(e: Any, log_dir: str, world: int | None = None) -> list[str]:
    """One line per failed rank, the root cause first. The agent may stop a failing rank before it counts
    it, so every error file the workers wrote is read too, not only the agent's list. When every failure
    is a peer timing out or losing its connection and ``world`` is known (one host), the ranks that never
    failed themselves are named first: a stuck rank (stopped, hung in a kernel) fails nothing, its peers
    time out waiting for it, and the agent stops it."""
    found: dict[int, tuple[str, str]] = {}
    for rank, failure in e.failures.items():
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        found[rank] = (how, _failure_reason(failure.message))
    for path in glob.glob(os.path.join(log_dir, "**", "error.json"), recursive=True):
        try:
            rank = int(os.path.basename(os.path.dirname(path)))
            with open(path) as f:
                message = json.load(f).get("message", "")
        except (ValueError, OSError):
            continue
        reason = _failure_reason(message)
        if rank not in found or any(s in found[rank][1] for s in _SECONDARY):
            found[rank] = (found.get(rank, ("raised", ""))[0], reason)
    order = sorted(found, key=lambda r: (any(s in " ".join(found[r]) for s in _SECONDARY), r))
    lines = [f"shardflow: rank {r} failed ({found[r][0]}): {found[r][1]}" for r in order]
    secondary = all(any(s in " ".join(found[r]) for s in _SECONDARY) for r in found)
    silent = [r for r in range(world or 0) if r not in found]
    if found and secondary and silent:
        who = ("rank " if len(silent) == 1 else "ranks ") + ", ".join(map(str, silent))
        lines.insert(
            0,
            f"shardflow: {who} never failed but stopped answering: the others timed out waiting for it "
            f"(stuck or stopped; {'it was' if len(silent) == 1 else 'they were'} terminated by the launcher)",
        )
    return lines


def _run_id(entry: str, args: list[str], nnodes: int, rdzv_endpoint: str | None) -> str:
    """The rendezvous id: random on one host; on several, the same on every host of the job (the agents of
    one job must join one rendezvous), so derived from what every host's command line shares."""
    if nnodes == 1 or not rdzv_endpoint:
        return f"shardflow-{uuid.uuid4().hex[:12]}"
    shared = "\0".join([rdzv_endpoint, str(nnodes), entry, *args])
    return f"shardflow-{hashlib.sha256(shared.encode()).hexdigest()[:12]}"


def launch(
    entry: str,
    nprocs: int,
    args: list[str] | None = None,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    local_addr: str | None = None,
    max_restarts: int = 0,
) -> int:
    """Run ``entry`` on ``nprocs`` ranks per host; 0 when every rank returns 0, else a non-zero exit code.

    A rank that raises (or dies) stops the whole job; which rank failed, and why, is printed to stderr.
    With ``nnodes > 1`` every host runs this with the same ``rdzv_endpoint`` (``host:port``); torchrun's
    c10d rendezvous then numbers the hosts.
    """
    if nnodes < 1:
        raise ValueError(f"nnodes must be a positive int, got {nnodes!r}")
    if nnodes > 1 and not rdzv_endpoint:
        raise ValueError("a job on several hosts needs rdzv_endpoint='host:port' (the same on every host)")
    if not isinstance(nprocs, int) or isinstance(nprocs, bool) or nprocs < 1:
        raise ValueError(f"nprocs must be a positive int, got {nprocs!r}")
    _check_target(entry)
    # Imported here, not at the top: only launching needs torch's elastic agent.
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="shardflow_launch_") as log_dir:
        config = LaunchConfig(
            min_nodes=nnodes,
            max_nodes=nnodes,
            nproc_per_node=nprocs,
            run_id=_run_id(entry, args or [], nnodes, rdzv_endpoint),
            rdzv_backend="c10d",
            # one host: port 0 lets the rendezvous store bind a free port itself (no race), and MASTER_ADDR is
            # loopback because the host name may not resolve
            rdzv_endpoint=rdzv_endpoint or "127.0.0.1:0",
            local_addr=local_addr or ("127.0.0.1" if nnodes == 1 else None),
            # a host that names its address hosts the rendezvous store when the endpoint is that address
            # (torchrun otherwise decides by host name, which fails where names do not resolve)
            rdzv_configs={"is_host": local_addr == rdzv_endpoint.rsplit(":", 1)[0]}
            if local_addr and rdzv_endpoint
            else {},
            max_restarts=max_restarts,
            monitor_interval=0.1,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=log_dir),  # error files only; output goes to the console
        )
        done = threading.Event()
        threading.Thread(target=_kill_stopped_workers, args=(os.getpid(), done), daemon=True).start()
        try:
            results = elastic_launch(config, _worker)(entry, list(args or []), os.getpid())
        except ChildFailedError as e:
            for line in _failure_report(e, log_dir, nprocs if nnodes == 1 else None):
                print(line, file=sys.stderr)
            codes = [f.exitcode for f in e.failures.values()]
            return next((c for c in codes if c > 0), 1)
        except SignalException as e:
            print(f"shardflow: stopped by {e.sigval.name}; all ranks were terminated", file=sys.stderr)
            return 128 + int(e.sigval)
        finally:
            done.set()
    by_code: dict[int, list[int]] = {}
    for rank, code in sorted(results.items()):
        if code:
            by_code.setdefault(int(code), []).append(rank)
    for code, ranks in by_code.items():
        who = ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))
        print(f"shardflow: {who} exited with code {code}", file=sys.stderr)
    return next(iter(by_code), 0)


__all__ = ["launch"]
