"""A job in which rank 1 never joins a collective: rank 0 must fail by the timeout it configured (3 s)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("stuck_rank.py")


def test_a_stuck_peer_fails_the_job_by_the_configured_timeout():
    code = f"from shardflow.cli.launch import launch; raise SystemExit(launch({str(SCRIPT)!r}, 2, []))"
    # rank 1 sleeps 600 s: ending within this 120 s hang deadline means rank 0 gave up on it, and gloo's message
    # names the 3 s it waited (the default timeout, 60 s, would also end within the deadline)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "rank 0 failed" in out.stderr, out.stderr[-3000:]
    assert "Timed out waiting 3000ms" in out.stderr, out.stderr[-3000:]
