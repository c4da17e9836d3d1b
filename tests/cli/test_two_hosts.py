"""Two hosts on one machine: two network namespaces joined by a veth pair, one `shardflow run` agent in each
(torchrun's c10d rendezvous across them, gloo between the workers). A job spans both hosts; the 2x2
training demo over them equals serial PyTorch; a rank that raises, or a worker killed, on one host ends
both agents (within 30 s for the kill), with the rank named, and leaves no process behind.

Needs root (network namespaces); elsewhere the tests skip and say why, except under CI=true, where they fail:
a CI machine that cannot run them must not pass quietly without them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

JOB = Path(__file__).with_name("run_job.py")
TRAIN_JOB = Path(__file__).with_name("train_job.py")
ROOT = Path(__file__).resolve().parents[2]


def _cannot_run(reason: str) -> None:
    """Skip, saying why; under CI (CI=true) fail instead, so a CI job never passes without these tests."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the two-host tests cannot run: {reason}")
    pytest.skip(reason)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def hosts() -> Iterator[list[tuple[str, str, str]]]:
    """[(namespace, address, interface)] of two connected hosts; torn down after the test."""
    if os.geteuid() != 0:
        _cannot_run("network namespaces need root")
    tag = f"{os.getpid() % 100000}"
    made = [(f"sfh{tag}a", "10.231.7.1", f"sfv{tag}a"), (f"sfh{tag}b", "10.231.7.2", f"sfv{tag}b")]
    try:
        try:
            for ns, _, _ in made:
                _ip("netns", "add", ns)
        except (OSError, subprocess.CalledProcessError) as e:
            _cannot_run(f"cannot create network namespaces here: {getattr(e, 'stderr', e)}")
        _ip("link", "add", made[0][2], "type", "veth", "peer", "name", made[1][2])
        for ns, addr, dev in made:
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield made
    finally:
        for ns, _, _ in made:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _agents(hosts, *job_args: str, job: str = str(JOB)) -> list[subprocess.Popen]:  # type: ignore[no-untyped-def]
    endpoint = f"{hosts[0][1]}:29431"
    procs = []
    for ns, addr, dev in hosts:
        cmd = ["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={dev}", f"PYTHONPATH={ROOT}"]
        cmd += [sys.executable, "-m", "shardflow.cli.main", "run", "-n", "2", "--nnodes", "2"]
        cmd += ["--rdzv-endpoint", endpoint, "--local-addr", addr, job, *job_args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _left(hosts) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        p
        for ns, _, _ in hosts
        for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    ]


def test_a_job_spans_two_hosts(hosts, tmp_path):
    procs = _agents(hosts, str(tmp_path))
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    seen = sorted(f.read_text() for f in tmp_path.glob("rank*.txt"))
    assert seen == ["4 15.0 "] * 4  # four ranks over two hosts, each saw the whole job and its sum
    assert _left(hosts) == []


def test_a_failing_rank_on_one_host_stops_both(hosts, tmp_path):
    # run_job.py's collectives time out only after 300 s, so ending within the 180 s hang deadline means the
    # agents stopped the job, not a peer's timeout
    procs = _agents(hosts, str(tmp_path), "--fail")
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode != 0 for p in procs), [err[-2000:] for _, err in outs]
    assert any("rank 1 failed" in err and "rank 1 was told to fail" in err for _, err in outs), outs
    assert _left(hosts) == []


def test_a_2x2_run_over_two_hosts_equals_serial(hosts):
    """The training demo (a GPT on a 2x2 dp x tp mesh) over two hosts checks its own losses against serial
    PyTorch and fails when they differ (tests/cli/test_demo.py shows it failing on a changed tensor)."""
    procs = _agents(hosts, "--steps", "3", job="shardflow.demo.train_gpt:main")
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert any("steps match serial PyTorch" in out for out, _ in outs), [out[-2000:] for out, _ in outs]
    assert not any("✗" in out for out, _ in outs)


def test_a_worker_killed_on_one_host_stops_the_other_within_30_s(hosts, tmp_path):
    # train_job.py holds rank 2 once every rank has finished step 2 (training is under way, by construction),
    # wherever the rendezvous put it; it is killed there
    config = str(ROOT / "examples" / "gpt.toml")
    flags = "--mesh 4 --axes dp --strategy dp --model.args.n_layer 1 --model.args.n_embd 32".split()
    flags += ["--model.args.block_size", "16", "--steps", "100000", "--snapshot_every", "100000"]
    hold = ["step", "2", "2", str(tmp_path)]
    procs = _agents(hosts, *hold, config, *flags, "--run_dir", str(tmp_path / "run"), job=str(TRAIN_JOB))
    held = tmp_path / "held"
    deadline = time.monotonic() + 180  # a hang deadline: starting and two steps take seconds
    while not held.exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "rank 2 was never held"
        time.sleep(0.05)
    victim = int(held.read_text())
    assert Path(f"/proc/{victim}/comm").read_text().strip() == "sf-rank2"
    os.kill(victim, 9)
    killed = time.monotonic()
    outs = [p.communicate(timeout=120) for p in procs]
    # the documented bound, kept as a check of it, not a timing: measured 25 s with the 2 cores shared by ~28
    # busy processes, so the margin is thin only on a machine that loaded
    assert time.monotonic() - killed <= 30, time.monotonic() - killed
    assert all(p.returncode != 0 for p in procs)
    assert any("rank 2 failed (signal SIGKILL)" in err for _, err in outs), [err[-2000:] for _, err in outs]
    assert _left(hosts) == []


def _outcome(reason: str) -> BaseException:
    """What ``_cannot_run`` raised (caught here: a skip escaping a check would skip this test, not fail it)."""
    try:
        _cannot_run(reason)
    except BaseException as e:  # noqa: BLE001 - pytest's outcomes are BaseExceptions
        return e
    raise AssertionError("_cannot_run returned instead of failing or skipping")


def test_without_network_namespaces_ci_fails_and_a_user_is_told_why(monkeypatch):
    monkeypatch.setenv("CI", "true")
    ci = _outcome("need root")
    assert isinstance(ci, pytest.fail.Exception), repr(ci)
    assert str(ci) == "CI=true but the two-host tests cannot run: need root"
    monkeypatch.delenv("CI")
    user = _outcome("need root")
    assert isinstance(user, pytest.skip.Exception) and str(user) == "need root", repr(user)
