"""SLURM detection for `shardflow run`: the host count and rendezvous host come from SLURM's environment
(node lists in SLURM's compressed form), a single-host allocation or no SLURM changes nothing, and a
broken environment is a clear error."""

from __future__ import annotations

import pytest

from shardflow.cli.slurm import first_host, from_env


@pytest.mark.parametrize(
    "nodelist, host",
    [("node07", "node07"), ("gpu[03-05,09],cpu1", "gpu03"), ("a1,b2", "a1"), ("rack2-n[12]", "rack2-n12")],
)
def test_first_host_of_a_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_a_multi_host_allocation_gives_hosts_and_rendezvous():
    job = from_env({"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "n[10-12]"})
    assert job is not None and job.nnodes == 3 and job.rdzv_endpoint == "n10:29400"
    assert from_env({"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1"}) is None
    assert from_env({"PATH": "/bin"}) is None


def test_a_broken_slurm_environment_names_the_variable():
    with pytest.raises(ValueError, match="SLURM_JOB_NUM_NODES='many'"):
        from_env({"SLURM_JOB_ID": "1", "SLURM_JOB_NUM_NODES": "many"})
    with pytest.raises(ValueError, match="without SLURM_JOB_NODELIST"):
        from_env({"SLURM_JOB_ID": "1", "SLURM_NNODES": "2"})
    with pytest.raises(ValueError, match="cannot read SLURM node list"):
        first_host("[01-02]")


def test_shardflow_run_reads_slurm(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    job = str(Path(__file__).with_name("run_job.py"))
    env = dict(os.environ, SLURM_JOB_ID="7", SLURM_NNODES="2")  # two hosts, but no node list
    cmd = [sys.executable, "-m", "shardflow.cli.main", "run", "-n", "1", job, str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and "without SLURM_JOB_NODELIST" in p.stderr, p.stderr[-2000:]
    one = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(env, SLURM_NNODES="1"))
    assert one.returncode == 0, one.stderr[-2000:]  # a one-host allocation runs here as without SLURM
