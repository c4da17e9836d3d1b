"""``shardflow demo`` end to end: a real ``python -m shardflow.cli.main`` process that starts 4 gloo ranks.

Also pins that failures reach the exit code: a demo whose logical tensor changes in transit exits 1 and
says so, and a rank that raises is named by the launcher.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # 4 ranks importing torch on 2 busy cores; the demo itself takes well under a minute
ROUTES = ("all_gather", "reduce_scatter", "all_to_all", "all_reduce", "send_recv")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def _shardflow(*args: str) -> subprocess.CompletedProcess[str]:
    return _run("-m", "shardflow.cli.main", *args)


def _launch(target: str, nprocs: int) -> subprocess.CompletedProcess[str]:
    code = f"import sys; from shardflow.cli.launch import launch; sys.exit(launch({target!r}, {nprocs}, []))"
    return _run("-c", code)


def _output(p: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"


# ------------------------------------------------------------------ run on the ranks by the tests below


def _tour_with_a_corrupted_source() -> int:
    """The demo, but every S(0) source on a 1-d mesh is laid out from a wrong tensor (value + 1)."""
    import shardflow as sf
    from shardflow.demo import boxing_tour

    source = boxing_tour._source

    def corrupted(value, mesh, sbp, rank):  # type: ignore[no-untyped-def]
        return source(value + 1 if tuple(sbp) == (sf.S(0),) else value, mesh, sbp, rank)

    boxing_tour._source = corrupted
    return boxing_tour.main()


def _raise_on_rank_1() -> None:
    import torch.distributed as dist

    import shardflow as sf

    sf.init()
    if dist.get_rank() == 1:
        raise ValueError("rank 1 refuses")
    dist.barrier()  # the other ranks wait here until the launcher stops them


# ------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess[str]:
    return _shardflow("demo")


def test_demo_exits_0(demo: subprocess.CompletedProcess[str]) -> None:
    assert demo.returncode == 0, _output(demo)


def test_demo_table_shows_every_route(demo: subprocess.CompletedProcess[str]) -> None:
    missing = [r for r in ROUTES if r not in demo.stdout]
    assert not missing, f"routes {missing} not in the table\n{_output(demo)}"
    assert "✗" not in demo.stdout, _output(demo)


def test_demo_summary_says_all_survived(demo: subprocess.CompletedProcess[str]) -> None:
    m = re.search(r"(\d+) conversions, all logical tensors survived", demo.stdout)
    assert m is not None, _output(demo)
    assert int(m.group(1)) >= 16 + 10 + 8, _output(demo)  # 1-d pairs, 2×2 cases, cross-mesh cases
    assert demo.stdout.count("✓") == int(m.group(1)), _output(demo)
    assert "boxing (P, S(1)) -> (S(1), B)" in demo.stdout, _output(demo)  # the explained plan


def test_demo_fails_when_a_tensor_changes() -> None:
    p = _launch("tests.cli.test_demo:_tour_with_a_corrupted_source", 4)
    assert p.returncode == 1, _output(p)
    assert "all logical tensors survived" not in p.stdout, _output(p)
    assert re.search(r"\d+ of \d+ conversions FAILED", p.stdout), _output(p)
    assert p.stdout.count("✗") >= 4, _output(p)  # at least S(0) -> B, P, S(0), S(1) on the 1-d mesh


def test_launch_names_the_failed_rank() -> None:
    p = _launch("tests.cli.test_demo:_raise_on_rank_1", 2)
    assert p.returncode != 0, _output(p)
    assert "rank 1 failed" in p.stderr and "ValueError: rank 1 refuses" in p.stderr, _output(p)


def test_help() -> None:
    p = _shardflow("--help")
    assert p.returncode == 0, _output(p)
    assert "demo" in p.stdout, _output(p)
    p = _shardflow("demo", "--help")
    assert p.returncode == 0 and "--nprocs" in p.stdout, _output(p)


def test_unknown_subcommand_is_an_error() -> None:
    p = _shardflow("frobnicate")
    assert p.returncode == 2 and "invalid choice: 'frobnicate'" in p.stderr, _output(p)


def test_demo_needs_four_ranks() -> None:
    p = _shardflow("demo", "-n", "2")
    assert p.returncode == 2 and "at least 4 ranks" in p.stderr, _output(p)
