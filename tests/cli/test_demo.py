"""``shardflow demo`` end to end: a real ``python -m shardflow.cli.main`` process that starts 4 gloo ranks.

The default demo trains the GPT on the standard library's source for a few steps: it must exit 0, say its
first steps match serial PyTorch, and print a loss that falls (a mismatch report is checked in-process).
``--boxing`` runs the tour of layout conversions. Also pins that failures reach the exit code: a tour whose
logical tensor changes in transit exits 1 and says so, and a rank that raises is named by the launcher.
"""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import shardflow as sf
from shardflow.runtime.trace import read

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # 4 ranks importing torch on 2 busy cores; the demo itself takes well under a minute
ROUTES = ("all_gather", "reduce_scatter", "all_to_all", "all_reduce", "send_recv")
TRAIN_STEPS = "8"  # enough for the loss to fall from ~ln(256) on every Python's source; few, for test time
LOSS_LINE = re.compile(r"loss (\d+\.\d+) → (\d+\.\d+) \(mean of the first")
MATCH_LINE = "first 3 steps match serial PyTorch ✓"


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
def train() -> subprocess.CompletedProcess[str]:
    return _shardflow("demo", "--steps", TRAIN_STEPS)


@pytest.fixture(scope="module")
def tour() -> subprocess.CompletedProcess[str]:
    return _shardflow("demo", "--boxing")


def test_train_exits_0_and_matches_serial(train: subprocess.CompletedProcess[str]) -> None:
    assert train.returncode == 0, _output(train)
    assert MATCH_LINE in train.stdout and "✗" not in train.stdout, _output(train)


def test_train_loss_falls(train: subprocess.CompletedProcess[str]) -> None:
    m = LOSS_LINE.search(train.stdout)
    assert m is not None, _output(train)
    first, last = float(m.group(1)), float(m.group(2))
    assert math.isfinite(first) and math.isfinite(last), _output(train)
    assert 4.5 < first < 6.0, _output(train)  # starts near ln(256) = 5.55: an untrained byte-level model
    assert last < first - 0.3, _output(train)


def test_train_shows_plan_progress_and_speed(train: subprocess.CompletedProcess[str]) -> None:
    out = train.stdout
    assert "dp × tp = 2 × 2" in out, _output(train)
    assert re.search(r"transformer\.h\.0\.attn\.c_attn\.weight\s+\(192, 64\)\s+\(B, Blocked\(0, 3\)\)", out), _output(
        train
    )
    assert f"{TRAIN_STEPS}/{TRAIN_STEPS}" in out, _output(train)  # the progress bar's last state
    assert re.search(r"the rest ran at [\d,]+ tokens/s, [\d.]+ [kMGT]?FLOP/s, MFU [\d.]+%", out), _output(train)
    assert re.search(r"step +\d+ +loss [\d.]+ +[\d,]+ tokens/s, [\d.]+ [kMGT]?FLOP/s, MFU [\d.]+%", out), _output(train)


def test_train_reports_a_mismatch() -> None:
    """In-process (no ranks): the summary names the steps that differ from serial PyTorch."""
    from rich.console import Console

    from shardflow.demo.train_gpt import _summary
    from shardflow.runtime.meter import Peak

    buf = io.StringIO()
    console = Console(file=buf, width=120)
    meter = sf.Meter(sf.Flops(forward=1, backward=2), devices=1, peak=Peak(1e9, "given"))
    _summary(console, [5.3, 5.1, 4.7, 4.6], [3.0, 3.5, 4.0, 4.5], [5.3, 5.2, 4.7], every_rank_ok=False, meter=meter)
    out = buf.getvalue()
    assert "do NOT match serial PyTorch" in out and "step 2: shardflow 5.100000, serial PyTorch 5.200000" in out, out
    assert MATCH_LINE not in out, out


def test_compare() -> None:
    from shardflow.demo.train_gpt import compare

    assert compare([5.0, 4.0], [5.0, 4.0 * (1 + 5e-5)]) == []
    assert compare([5.0, 4.0, 3.0], [5.0, 4.01, math.nan]) == [2, 3]


def test_tour_exits_0(tour: subprocess.CompletedProcess[str]) -> None:
    assert tour.returncode == 0, _output(tour)


def test_tour_table_shows_every_route(tour: subprocess.CompletedProcess[str]) -> None:
    missing = [r for r in ROUTES if r not in tour.stdout]
    assert not missing, f"routes {missing} not in the table\n{_output(tour)}"
    assert "✗" not in tour.stdout, _output(tour)


def test_tour_summary_says_all_survived(tour: subprocess.CompletedProcess[str]) -> None:
    m = re.search(r"(\d+) conversions, all logical tensors survived", tour.stdout)
    assert m is not None, _output(tour)
    assert int(m.group(1)) >= 16 + 10 + 8, _output(tour)  # 1-d pairs, 2×2 cases, cross-mesh cases
    assert tour.stdout.count("✓") == int(m.group(1)), _output(tour)
    assert "boxing (P, S(1)) -> (S(1), B)" in tour.stdout, _output(tour)  # the explained plan


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
    assert p.returncode == 0, _output(p)
    assert all(opt in p.stdout for opt in ("--nprocs", "--steps", "--boxing")), _output(p)


def test_unknown_subcommand_is_an_error() -> None:
    p = _shardflow("frobnicate")
    assert p.returncode == 2 and "invalid choice: 'frobnicate'" in p.stderr, _output(p)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-n", "2"], "at least 4 ranks"),
        (["--boxing", "-n", "3"], "at least 4 ranks"),
        (["-n", "5"], "even number of ranks"),
        (["--steps", "2"], "--steps must be at least 3"),
        (["--boxing", "--steps", "5"], "the boxing tour (--boxing) has neither"),
        (["--boxing", "--pipeline", "t.json"], "--steps and --pipeline are for the training demo"),
    ],
)
def test_demo_rejects_bad_options(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from shardflow.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["demo", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_pipeline_demo_matches_serial_and_draws_its_timeline(tmp_path):
    trace = tmp_path / "step.json"
    p = _shardflow("demo", "--steps", "3", "--pipeline", str(trace))
    assert p.returncode == 0, _output(p)
    assert MATCH_LINE in p.stdout and "✗" not in p.stdout, _output(p)
    assert "2 stage(s) over mesh axis 'pp'" in p.stdout, _output(p)  # the plan printed is the pipeline's
    assert (tmp_path / "step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {e.rank for e in read(trace)} == {0, 1, 2, 3}
