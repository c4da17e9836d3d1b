"""Timelines of a step: events per rank and track, written as a Chrome/Perfetto trace and drawn as a PNG.

Each rank records ``(track, name, start, end)`` with the wall clock (``time.time_ns``: comparable across
processes, and across hosts as far as their clocks agree); a traced step gathers every rank's events and
rank 0 writes one JSON file in the Trace Event Format (``ph: "X"`` complete events, one process per rank,
one thread per track), which chrome://tracing and ui.perfetto.dev open. ``render`` draws the same events
with matplotlib, one row per rank and track, for a person to read at a glance.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Event:
    rank: int
    track: str
    name: str
    start_ns: int
    end_ns: int


class Recorder:
    """Collects one rank's events while ``enabled``; costs one branch per span when not."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.enabled = False
        self.events: list[Event] = []

    @contextmanager
    def span(self, track: str, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.time_ns()
        try:
            yield
        finally:
            self.events.append(Event(self.rank, track, name, start, time.time_ns()))


def to_json(events: Sequence[Event]) -> dict[str, Any]:
    """The Trace Event Format document for ``events`` (timestamps in µs from the earliest event)."""
    t0 = min((e.start_ns for e in events), default=0)
    tracks = sorted({(e.rank, e.track) for e in events})
    tid = {key: i for i, key in enumerate(tracks)}
    out: list[dict[str, Any]] = []
    for rank in sorted({r for r, _ in tracks}):
        out.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
    for (rank, track), i in tid.items():
        out.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": i, "args": {"name": track}})
    for e in events:
        out.append(
            {
                "name": e.name,
                "cat": e.track,
                "ph": "X",
                "pid": e.rank,
                "tid": tid[(e.rank, e.track)],
                "ts": (e.start_ns - t0) / 1e3,
                "dur": (e.end_ns - e.start_ns) / 1e3,
            }
        )
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write(events: Sequence[Event], path: str | os.PathLike[str]) -> None:
    """Write the trace atomically (a temporary file renamed into place)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    tmp.write_text(json.dumps(to_json(events)))
    os.replace(tmp, target)


def read(path: str | os.PathLike[str]) -> list[Event]:
    """Events of a trace file written by ``write`` (or any Trace Event Format file with ``X`` events)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read trace {str(path)!r}: {exc}") from exc
    raw = doc["traceEvents"] if isinstance(doc, dict) else doc
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in raw if e.get("ph") == "M" and e["name"] == "thread_name"}
    events = []
    for e in raw:
        if e.get("ph") != "X":
            continue
        track = names.get((e["pid"], e.get("tid")), str(e.get("tid", e.get("cat", ""))))
        start = int(float(e["ts"]) * 1e3)
        events.append(Event(int(e["pid"]), track, e["name"], start, start + int(float(e["dur"]) * 1e3)))
    if not events:
        raise ValueError(f"trace {str(path)!r} has no complete ('X') events to draw")
    return events


_COLOURS = {
    "F": "#4c78a8",
    "B": "#f58518",
    "W": "#e45756",
    "all-reduce": "#54a24b",
    "optimizer": "#b279a2",
    "wait": "#bab0ac",
}


def render(events: Sequence[Event], png: str | os.PathLike[str], title: str = "") -> None:
    """Draw one row per (rank, track): forwards blue, backwards orange (a split backward's weight
    gradients, ``W``, red), all-reduce green, waits grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({(e.rank, e.track) for e in events})
    t0 = min(e.start_ns for e in events)
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(rows) + 1.2))
    for y, key in enumerate(rows):
        for e in (e for e in events if (e.rank, e.track) == key):
            kind = e.name.split()[0] if e.name[:1] not in "FBW" else e.name[0]
            colour = _COLOURS.get(kind, "#72b7b2")
            left, width = (e.start_ns - t0) / 1e6, (e.end_ns - e.start_ns) / 1e6
            ax.broken_barh([(left, width)], (y - 0.4, 0.8), facecolors=colour, edgecolors="white", linewidth=0.3)
            if width > 0 and e.name[:1] in "FBW" and e.name[1:].isdigit():
                ax.text(left + width / 2, y, e.name[1:], ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(len(rows)), [f"rank {r} {t}" for r, t in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(
        title or "shardflow step (blue: forward, orange: backward, red: weights' gradients, numbers: micro-batch)"
    )
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def idle_fraction(events: Sequence[Event], track: str = "compute") -> float:
    """Mean over ranks of the time a rank's ``track`` is idle between the first and last event on it anywhere."""
    busy = [e for e in events if e.track == track]
    if not busy:
        raise ValueError(f"no events on track {track!r}")
    start, end = min(e.start_ns for e in busy), max(e.end_ns for e in busy)
    ranks = sorted({e.rank for e in busy})
    used = [sum(e.end_ns - e.start_ns for e in busy if e.rank == r) for r in ranks]
    return 1.0 - sum(used) / (len(ranks) * (end - start))
