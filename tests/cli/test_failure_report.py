"""The launcher's failure report names the root cause first: a rank that never failed but stopped answering
is named when every failure is a peer timing out or losing its connection (gloo words that several ways)."""

from __future__ import annotations

from types import SimpleNamespace

from shardflow.cli.launch import _failure_report


def _failure(message: str, exitcode: int = 1) -> SimpleNamespace:
    return SimpleNamespace(exitcode=exitcode, message=message, signal_name=lambda: "SIGKILL")


def test_a_silent_rank_is_named_when_every_failure_is_secondary(tmp_path):
    failures = {
        0: _failure("RuntimeError: Application timeout caused pair closure"),
        1: _failure("RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 60000ms for recv"),
        3: _failure("RuntimeError: Connection closed by peer [127.0.0.1]:1234"),
    }
    lines = _failure_report(SimpleNamespace(failures=failures), str(tmp_path), world=4)
    assert lines[0].startswith("shardflow: rank 2 never failed but stopped answering"), lines


def test_a_real_error_comes_first_and_no_rank_is_called_silent(tmp_path):
    failures = {
        0: _failure("RuntimeError: Timed out waiting 60000ms for send operation to complete"),
        1: _failure("ValueError: batch 3 has 5 columns, the model wants 4"),
    }
    lines = _failure_report(SimpleNamespace(failures=failures), str(tmp_path), world=2)
    assert lines[0].startswith("shardflow: rank 1 failed (exit code 1): ValueError"), lines
    assert not any("never failed" in line for line in lines), lines
