"""The actors beside a compiled step's compute: each gradient bucket's all-reduce, then its optimizer update.

The step's program (compute, on the calling thread) hands on each update unit the moment its gradients
exist and nothing later reads its parameters (``ready(unit, payload)``; graph/ir/release.py decides where).
An ``all-reduce`` actor waits for that unit's collective and an ``optimizer`` actor updates the unit's
parameters, so layer 3's update runs while layer 2's backward still computes, as DDP's reducer overlaps
only the all-reduce. Three vehicles for the same graph:

- ``"threads"``: the actors of runtime/actors.py, one thread each (waits and kernels release the GIL); their
  registers bound what waits: the all-reduce actor holds at most two reduced buckets the optimizer has not
  taken. Right where the compute thread only launches kernels (GPU) and cores are spare.
- ``"loop"``: an event loop on the compute thread: at every release point, each unit whose collective has
  completed is updated, in order; once backward is over the rest are waited for. No thread competes with
  compute for a core or the GIL (on CPU, with one core per rank, threads slowed steps: BENCHMARKS.md, Overlap).
- ``"inline"``: each unit reduced (waiting for its collective) and updated right at its release point:
  deterministic and the earliest an update can run, which is what tests use to prove the release points safe.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from shardflow.runtime.actors import Actor, ActorError, Chain
from shardflow.runtime.trace import Event

_DONE = object()


class UpdateActors:
    """``ready`` is what the program calls; ``finish`` waits until every unit handed on is updated."""

    def __init__(
        self,
        reduce: Callable[[int, Any], Any],
        update: Callable[[int, Any], None],
        units: int,
        rank: int = 0,
        vehicle: str = "threads",
        completed: Callable[[int, Any], bool] = lambda unit, payload: True,
    ) -> None:
        if vehicle not in ("threads", "loop", "inline"):
            raise ValueError(f"vehicle must be 'threads', 'loop' or 'inline', got {vehicle!r}")
        self.reduce, self.update, self.units, self.rank = reduce, update, units, rank
        self.vehicle, self.completed = vehicle, completed
        self.events: list[Event] = []
        self.backward_end_ns: int | None = None  # when the program said backward is over
        self._handed = 0
        self._pending: deque[tuple[int, Any]] = deque()  # the loop's units waiting for their collective
        self._chain: Chain | None = None
        self._failure: ActorError | None = None  # the loop's or inline vehicle's first failure, raised by finish
        if vehicle == "threads" and units:
            self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
            stop = threading.Event()
            reducer = Actor("all-reduce", self._reduce, 2, self._incoming(), stop, self.events, rank)
            updater = Actor("optimizer", self._update, units, reducer, stop, self.events, rank)
            self._chain = Chain([reducer.start(), updater.start()])

    def _incoming(self) -> Iterator[tuple[int, Any]]:
        while (item := self._inbox.get()) is not _DONE:
            yield item

    def _reduce(self, item: tuple[int, Any]) -> tuple[int, Any]:
        unit, payload = item
        return unit, self.reduce(unit, payload)

    def _update(self, item: tuple[int, Any]) -> int:
        unit, grads = item
        self.update(unit, grads)
        return unit

    def ready(self, unit: int | None, payload: Any) -> None:
        """Called by the program: unit ``unit``'s gradients (or its bucket's handle) are ready; None: backward
        is over."""
        if unit is None:
            self.backward_end_ns = time.time_ns()
            while self._pending:  # backward is over: nothing left to overlap with
                self._run(*self._pending.popleft())
            return
        self._handed += 1
        if self.vehicle == "threads":
            self._inbox.put((unit, payload))
        elif self.vehicle == "inline":
            self._run(unit, payload)
        else:
            self._pending.append((unit, payload))
            while self._pending and self.completed(*self._pending[0]):
                self._run(*self._pending.popleft())

    def _run(self, unit: int, payload: Any) -> None:
        """Both actors' tasks for one unit, on this thread; a failure names the actor, as threads do.

        NOTE: a failure is kept and raised by ``finish``, not here: raising in the middle of the program
        would leave the peers waiting in its next collective (each rank's update may fail at another release
        point), so the program runs to its end and every rank raises once its collectives are matched."""
        if self._failure is not None:
            return  # the step has failed: no further unit is updated
        start = time.time_ns()
        try:
            grads = self.reduce(unit, payload)
        except Exception as exc:
            self._failure = ActorError(f"actor 'all-reduce' failed on unit {unit}: {exc!r}")
            self._failure.__cause__ = exc
            return
        middle = time.time_ns()
        try:
            self.update(unit, grads)
        except Exception as exc:
            self._failure = ActorError(f"actor 'optimizer' failed on unit {unit}: {exc!r}")
            self._failure.__cause__ = exc
            return
        self.events.append(Event(self.rank, "all-reduce", f"all-reduce {unit}", start, middle))
        self.events.append(Event(self.rank, "optimizer", f"optimizer {unit}", middle, time.time_ns()))

    def finish(self) -> None:
        """Wait for every unit's update; an actor's failure is raised here (an ``ActorError`` naming it)."""
        if self._handed != self.units:
            self.close()
            raise AssertionError(f"the step released {self._handed} of {self.units} update units")
        while self._pending:  # a program that ended without saying backward is over
            self._run(*self._pending.popleft())
        if self._failure is not None:
            raise self._failure
        if self._chain is None:
            return
        self._inbox.put(_DONE)
        for _ in self._chain:  # every unit's token, freeing the optimizer's registers; ends with the chain
            pass

    def close(self) -> None:
        """Stop the actors (after a failure of the program itself)."""
        if self._chain is not None:
            self._inbox.put(_DONE)
            self._chain.close()


__all__ = ["ActorError", "UpdateActors"]
