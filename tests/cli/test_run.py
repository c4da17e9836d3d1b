"""`shardflow run -n N script.py args`: real ranks through torchrun's machinery, arguments passed
through, a failing rank named, and multi-host flags checked."""

import subprocess
import sys
from pathlib import Path

JOB = Path(__file__).with_name("run_job.py")


def _shardflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardflow.cli.main", *args], capture_output=True, text=True, timeout=180
    )


def test_run_starts_ranks_and_passes_arguments(tmp_path):
    p = _shardflow("run", "-n", "2", str(JOB), str(tmp_path), "--flag", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    seen = sorted(f.read_text() for f in tmp_path.glob("rank*.txt"))
    assert seen == ["2 15.0 --flag 1", "2 15.0 --flag 1"]


def test_run_names_the_failing_rank(tmp_path):
    p = _shardflow("run", "-n", "2", str(JOB), str(tmp_path), "--fail")
    assert p.returncode != 0
    assert "rank 1 failed" in p.stderr and "rank 1 was told to fail" in p.stderr, p.stderr[-3000:]


def test_a_pipeline_stage_that_raises_stops_every_rank(tmp_path):
    """The last stage raises mid-schedule while the first waits for its gradients: the job ends, not hangs,
    with the failing rank and the error named. The job's collectives time out after 300 s: ending within
    _shardflow's 180 s hang deadline means the launcher stopped rank 0."""
    p = _shardflow("run", "-n", "2", str(JOB.with_name("pipeline_job.py")))
    assert p.returncode != 0
    assert "rank 1 failed" in p.stderr and "out of bounds" in p.stderr, p.stderr[-3000:]
    if sys.version_info >= (3, 11):  # exception notes
        assert "in pipeline stage 1 on rank 1, forward of micro-batch" in p.stderr, p.stderr[-3000:]
    assert "rank 0 step 2" in p.stdout and "step 3" not in p.stdout, p.stdout


def test_several_hosts_need_a_rendezvous_endpoint():
    p = _shardflow("run", "-n", "2", "--nnodes", "2", str(JOB))
    assert p.returncode == 2
    assert "--nnodes > 1 needs --rdzv-endpoint HOST:PORT" in p.stderr
