"""Fail fast, with real processes and real signals: while ``shardflow train``'s worker trains on 4 ranks, one
worker is killed with SIGKILL (dead peer) or stopped with SIGSTOP (stuck peer). Every rank must stop (within
30 s for a dead peer, within 2 minutes with default settings for a stuck one), the exit code is non-zero, the
message names the failed rank, and no process of the job is left. train_job.py holds the victim at a known
step (or inside a known save) until the test signals it, so a fault lands where the test says by
construction, never where reading the job's output happened to catch up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shardflow.train.loop import snapshots

ROOT = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("train_job.py")
HANG_S = 240  # a deadline that only catches hangs: every wait below takes seconds (a minute for a stopped rank)
FLAGS = ["--mesh", "4", "--axes", "dp", "--strategy", "dp", "--model.args.n_layer", "1", "--model.args.n_embd", "32"]
FLAGS += ["--model.args.block_size", "16", "--steps", "100000", "--log_every", "1", "--snapshot_every", "100000"]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _rank_of(pid: int) -> int | None:
    """A worker's rank from its process name (the launcher names workers ``sf-rank<N>``)."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    return int(name[len("sf-rank") :]) if name.startswith("sf-rank") and name[7:].isdigit() else None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _train_cmd(run_dir: Path, *extra: str) -> list[str]:
    """``shardflow train`` on the example config with the small test model, more flags appended."""
    config = str(ROOT / "examples" / "gpt.toml")
    return [sys.executable, "-m", "shardflow.cli.main", "train", config, *FLAGS, "--run_dir", str(run_dir), *extra]


def _job_cmd(tmp_path: Path, where: str, step: int, *extra: str, restarts: int = 0) -> list[str]:
    """``shardflow train``'s worker on 4 ranks through ``shardflow run``, rank 2 held by train_job.py at
    ``where`` ``step`` on the first attempt (its pid in tmp_path/held), more config flags appended."""
    cmd = [sys.executable, "-m", "shardflow.cli.main", "run", "-n", "4", "--max-restarts", str(restarts), str(JOB)]
    cmd += [where, "2", str(step), str(tmp_path), str(ROOT / "examples" / "gpt.toml"), *FLAGS]
    return [*cmd, "--run_dir", str(tmp_path / "run"), *extra]


def _start(cmd: list[str]) -> tuple[subprocess.Popen, list[str], list[str], list[threading.Thread]]:
    """The job, and its stdout and stderr lines as they come (read by threads, so no pipe fills up)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda s=s, b=b: b.extend(s), daemon=True)
        for s, b in ((proc.stdout, out), (proc.stderr, err))
    ]
    for r in readers:
        r.start()
    return proc, out, err, readers


def _wait(what: str, ready: Callable[[], bool], proc: subprocess.Popen, err: list[str]) -> None:
    """Poll ``ready`` until it holds; fail if the job ends first or after a deadline that only catches hangs."""
    deadline = time.monotonic() + HANG_S
    while not ready():
        assert proc.poll() is None, f"the job ended (code {proc.returncode}) before {what}: {''.join(err)[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {HANG_S} s: {''.join(err)[-3000:]}"
        time.sleep(0.05)


def _held(tmp_path: Path, proc: subprocess.Popen, err: list[str]) -> int:
    """The pid of rank 2 once train_job.py holds it where the test asked."""
    held = tmp_path / "held"
    _wait("rank 2 held", held.exists, proc, err)
    pid = int(held.read_text())
    assert _rank_of(pid) == 2, pid
    return pid


def _gone(pids: list[int]) -> list[int]:
    """``pids`` still alive once the job has ended: helpers that end on their own once their parent is gone
    (an orphaned worker checks every second) get 10 s, a deadline, not a sleep; what is left is an orphan."""
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _fault(
    tmp_path: Path, sig: signal.Signals, where: str = "step", step: int = 3, extra: tuple[str, ...] = ()
) -> tuple[int, str, float, list[int]]:
    """Train on 4 ranks; once rank 2 is held at ``where`` ``step`` (all ranks past step 3 by default), dump
    its stacks (SIGUSR1) and send it ``sig``; (exit code, stderr, seconds from ``sig`` to the job's end,
    processes of the job left)."""
    proc, _, err, readers = _start(_job_cmd(tmp_path, where, step, *extra))
    try:
        victim = _held(tmp_path, proc, err)
        everything = _descendants(proc.pid)
        assert sorted(r for r in map(_rank_of, everything) if r is not None) == [0, 1, 2, 3], everything
        os.kill(victim, signal.SIGUSR1)  # a worker prints its threads' stacks (what a stuck rank is doing)
        _wait("stack dump", lambda: "most recent call first" in "".join(err), proc, err)
        started = time.monotonic()
        os.kill(victim, sig)
        proc.wait(timeout=HANG_S)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    for r in readers:
        r.join(timeout=10)
    return proc.returncode, "".join(err), took, _gone(everything)


def test_a_killed_worker_stops_the_job_within_30_s(tmp_path):
    code, err, took, left = _fault(tmp_path, signal.SIGKILL)
    assert code != 0
    # the documented bound, kept as a check of it, not a timing: the agent sees the dead worker within 0.1 s
    # and stops the others; measured 18 s with the 2 cores shared by ~25 busy processes, 12 s of margin there
    assert took <= 30, took
    assert "rank 2 failed (signal SIGKILL)" in err, err[-3000:]
    assert "most recent call first" in err and "shardflow/train/loop.py" in err  # the SIGUSR1 stack dump
    assert left == [], left  # no orphan


def test_a_stopped_worker_stops_the_job_within_2_minutes(tmp_path):
    code, err, took, left = _fault(tmp_path, signal.SIGSTOP)
    assert code != 0
    # the documented bound, kept as a check of it: the peers' collectives time out after the default 60 s,
    # then the launcher kills the stopped rank at once; measured 100 s with the 2 cores shared by ~25 busy
    # processes (about 72 s unloaded, comm/init.py), 20 s of margin there
    assert took <= 120, took
    assert "shardflow: rank 2 never failed but stopped answering" in err, err[-3000:]
    assert left == [], left


def test_a_worker_killed_while_saving_leaves_the_last_snapshot_loadable(tmp_path):
    # a snapshot every step in the background; rank 2 is held inside the save of step 4's, before it writes
    # its part, and killed there: step 4's snapshot can never complete, and step 3's, which that save waited
    # for, is the newest complete one
    every = ("--snapshot_every", "1", "--keep_last", "3")
    code, err, _, left = _fault(tmp_path, signal.SIGKILL, "save", 4, every)
    assert code != 0 and left == [], err[-3000:]
    assert "rank 2 failed (signal SIGKILL)" in err, err[-3000:]
    run = tmp_path / "run"
    assert (run / "step00000004.partial").is_dir(), list(run.iterdir())  # the kill landed mid-save
    assert [s for s, _ in snapshots(str(run))][-1] == 3, list(run.iterdir())
    resumed = subprocess.run(
        _train_cmd(run, *every, "--steps", "5"),
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'step00000003'} (step 3)" in resumed.stdout, resumed.stdout
    assert "step 5/5: loss" in resumed.stdout
    assert [s for s, _ in snapshots(str(run))][-1] == 5


def test_with_restarts_a_killed_worker_rejoins_and_training_continues(tmp_path):
    """``--max-restarts 1``: rank 2, killed once every rank has finished step 5 (the snapshot of step 4
    complete), makes the agent restart every rank; they resume from that snapshot on their own, the resumed
    step 5 repeats the first one's loss exactly, and the job ends normally."""
    run = tmp_path / "run"
    cmd = _job_cmd(tmp_path, "step", 5, "--steps", "8", "--snapshot_every", "2", restarts=1)
    proc, out, err, readers = _start(cmd)
    try:
        os.kill(_held(tmp_path, proc, err), signal.SIGKILL)
        assert proc.wait(timeout=HANG_S) == 0, "".join(err)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    for r in readers:
        r.join(timeout=10)
    text = "".join(out)
    # exactly one restart, from step 4: a kill that landed after step 8 would resume from step 8
    assert [line for line in out if line.startswith("resumed from")] == [
        f"resumed from {run / 'step00000004'} (step 4)\n"
    ], text
    losses = [line.split()[1:] for line in out if line.startswith("loss ")]
    assert [int(s) for s, _ in losses] == [1, 2, 3, 4, 5, 5, 6, 7, 8], text
    assert float.fromhex(losses[4][1]) == float.fromhex(losses[5][1]), losses  # bit-identical on CPU
    assert "step 8/8" in text
    assert [s for s, _ in snapshots(str(run))][-1] == 8
