"""Step timelines: events round-trip through the Chrome trace format, the idle fraction is read from them,
and ``shardflow trace`` draws a PNG (or says which file it cannot read)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardflow.cli.main import main
from shardflow.runtime.trace import Event, idle_fraction, read, to_json, write

MS = 1_000_000


def _two_stage_events() -> list[Event]:
    # two ranks, each busy 8 of the 10 ms the step spans (times in ns; the order is only for show)
    return [
        Event(0, "compute", "F0", 0, 2 * MS),
        Event(0, "compute", "F1", 2 * MS, 4 * MS),
        Event(0, "compute", "B0", 6 * MS, 8 * MS),
        Event(0, "compute", "B1", 8 * MS, 10 * MS),
        Event(1, "compute", "F0", 2 * MS, 4 * MS),
        Event(1, "compute", "B0", 4 * MS, 6 * MS),
        Event(1, "compute", "F1", 6 * MS, 8 * MS),
        Event(1, "compute", "B1", 8 * MS, 10 * MS),
        Event(1, "recv", "wait F1", 6 * MS - 1000, 6 * MS),
    ]


def test_round_trip_and_idle_fraction(tmp_path: Path):
    events = _two_stage_events()
    path = tmp_path / "t.json"
    write(events, path)
    doc = json.loads(path.read_text())
    assert {e["ph"] for e in doc["traceEvents"]} == {"M", "X"}
    assert sorted(read(path), key=lambda e: (e.rank, e.track, e.start_ns)) == sorted(
        events, key=lambda e: (e.rank, e.track, e.start_ns)
    )
    assert to_json(events)["traceEvents"][-1]["ts"] == 5999.0  # microseconds from the earliest event
    # both ranks busy 8 ms of the 10 ms span
    assert idle_fraction(events) == pytest.approx(0.2)


def test_shardflow_trace_draws_a_png(tmp_path: Path, capsys):
    path = tmp_path / "step.json"
    write(_two_stage_events(), path)
    assert main(["trace", str(path)]) == 0
    png = tmp_path / "step.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "9 events on 2 rank(s), compute idle 20.0%" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["trace", str(tmp_path / "bad.json")]) == 2
    assert "cannot read trace" in capsys.readouterr().err
