import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).with_name("stuck_rank.py")


def test_a_stuck_peer_fails_the_job_within_the_timeout():
    code = f"from shardflow.cli.launch import launch; raise SystemExit(launch({str(SCRIPT)!r}, 2, []))"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert out.returncode != 0
    assert "rank 0" in out.stdout + out.stderr
    assert elapsed < 40, f"job took {elapsed:.0f} s to fail with a 3 s collective timeout"
