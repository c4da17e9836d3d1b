"""Fail fast, with real processes and real signals: during `shardflow train` on 4 ranks, one worker is
killed with SIGKILL (dead peer) or stopped with SIGSTOP (stuck peer). Every rank must stop (within 30 s for
a dead peer, within 2 minutes with default settings for a stuck one), the exit code is non-zero, the
message names the failed rank, and no process of the job is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from shardflow.train.loop import snapshots

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--mesh", "4", "--axes", "dp", "--strategy", "dp", "--model.n_layer", "1", "--model.n_embd", "32"]
FLAGS += ["--model.block_size", "16", "--steps", "100000", "--log_every", "1", "--snapshot_every", "100000"]


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


def _fault(
    tmp_path: Path, sig: signal.Signals, extra: tuple[str, ...] = (), saving: bool = False
) -> tuple[int, str, float, list[int], int]:
    """Train, and once step 3 is logged (and, with ``saving``, while a snapshot is being written) send ``sig``
    to rank 2; (exit code, stderr, seconds until the job ended, processes left, the rank)."""
    proc = subprocess.Popen(
        _train_cmd(tmp_path / "run", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda s=s, b=b: b.extend(s), daemon=True)
        for s, b in ((proc.stdout, out), (proc.stderr, err))
    ]
    for r in readers:
        r.start()
    try:
        deadline = time.monotonic() + 120
        run = tmp_path / "run"
        while not any("step 3/" in line for line in out) or (
            saving and not any(p.name.endswith(".partial") for p in run.iterdir())
        ):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(err)[-3000:]
            time.sleep(0.005 if saving else 0.2)
        workers = {p: _rank_of(p) for p in _descendants(proc.pid)}
        workers = {p: r for p, r in workers.items() if r is not None}
        assert sorted(workers.values()) == [0, 1, 2, 3], workers
        victim = next(p for p, r in workers.items() if r == 2)
        everything = _descendants(proc.pid)
        os.kill(victim, signal.SIGUSR1)  # a worker prints its threads' stacks (what a stuck rank is doing)
        time.sleep(1)
        started = time.monotonic()
        os.kill(victim, sig)
        proc.wait(timeout=240)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    for r in readers:
        r.join(timeout=10)
    time.sleep(1)
    left = [p for p in everything if _alive(p)]
    return proc.returncode, "".join(err), took, left, 2


def test_a_killed_worker_stops_the_job_within_30_s(tmp_path):
    code, err, took, left, rank = _fault(tmp_path, signal.SIGKILL)
    assert code != 0
    assert took <= 30, took
    assert f"rank {rank} failed (signal SIGKILL)" in err, err[-3000:]
    assert "most recent call first" in err and "shardflow/train/loop.py" in err  # the SIGUSR1 stack dump
    assert left == [], left  # no orphan


def test_a_stopped_worker_stops_the_job_within_2_minutes(tmp_path):
    code, err, took, left, rank = _fault(tmp_path, signal.SIGSTOP)
    assert code != 0
    assert took <= 120, took
    assert f"shardflow: rank {rank} never failed but stopped answering" in err, err[-3000:]
    assert left == [], left


def test_a_worker_killed_while_saving_leaves_the_last_snapshot_loadable(tmp_path):
    # a snapshot every step, in the background, and the kill sent while a ``.partial`` folder exists, i.e.
    # while a save is in flight (it may still complete if the killed rank had already written its part)
    bigger = ("--snapshot_every", "1", "--model.n_embd", "256", "--model.n_layer", "2", "--keep_last", "3")
    code, err, _, left, _ = _fault(tmp_path, signal.SIGKILL, bigger, saving=True)
    assert code != 0 and left == []
    run = tmp_path / "run"
    done = snapshots(str(run))
    assert done, list(run.iterdir())
    resumed = subprocess.run(
        _train_cmd(run, *bigger, "--steps", str(done[-1][0] + 2)),
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {done[-1][1]} (step {done[-1][0]})" in resumed.stdout, resumed.stdout
    assert f"step {done[-1][0] + 2}/{done[-1][0] + 2}: loss" in resumed.stdout


def test_with_restarts_a_killed_worker_rejoins_and_training_continues(tmp_path):
    """``--max-restarts 1``: a worker killed after step 5 makes the agent restart every rank; they resume
    from the newest snapshot (step 4) on their own, the resumed step 5 repeats the first one's loss exactly,
    and the job ends normally."""
    run = tmp_path / "run"
    flags = [*FLAGS, "--run_dir", str(run), "--steps", "8", "--snapshot_every", "2"]
    cmd = [sys.executable, "-m", "shardflow.cli.main", "train", "--max-restarts", "1"]
    cmd += [str(ROOT / "examples" / "gpt.toml"), *flags]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    lines: list[str] = []
    killed = False
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 5/8") and not killed:
            victim = next(p for p in _descendants(proc.pid) if _rank_of(p) == 2)
            os.kill(victim, signal.SIGKILL)
            killed = True
    assert proc.wait(timeout=120) == 0, "".join(err)[-3000:]
    text = "".join(lines)
    assert killed and "resumed from" in text and "(step 4)" in text, text
    fives = [line.split(",")[0] for line in lines if line.startswith("step 5/8")]
    assert len(fives) == 2 and fives[0] == fives[1], fives  # the same loss before the kill and after resuming
    assert "step 8/8" in text
    assert [s for s, _ in snapshots(str(run))][-1] == 8
