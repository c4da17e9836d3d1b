"""Actors and registers: work that runs when its input is ready and a register for its output is free.

An actor owns one task and a fixed number of output registers. It takes the next item from its input
registers, waits for one of its own registers to be free, runs, and puts the result there; its consumer
frees the register when it is done with the item. No loop decides the order: the register counts do.
With one register, an actor and its consumer alternate; with two, the actor works on item ``i + 1``
while the consumer still holds item ``i`` (what overlaps disk reads, host-to-device copies and compute);
more registers only buy slack against jitter, at the price of memory, which stays bounded.

Vehicle: one thread per actor. File reads, collation into tensors, copies and collectives release the GIL
in torch and the OS, so threads overlap real work without a process per actor and without pickling; the
actor's loop blocks on a semaphore (free registers) and a queue (ready items), so an idle actor costs
nothing. An exception inside an actor travels down the chain and is raised by the consumer, naming the
actor; closing the chain stops every actor (no thread outlives its chain).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from shardflow.runtime.trace import Event

_END = object()


@dataclass
class _Failure:
    actor: str
    error: BaseException


class ActorError(RuntimeError):
    """An actor's task raised; the message names the actor and the item."""


class Registers:
    """``count`` output slots of one actor: ``acquire`` blocks while all are taken, ``release`` frees one."""

    def __init__(self, count: int, name: str) -> None:
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"{name}: registers must be a positive int, got {count!r}")
        self.count, self.name = count, name
        self._free = threading.Semaphore(count)
        self._ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.taken = 0  # registers holding an item (ready or in use by the consumer)
        self.most_taken = 0  # the most ever held at once: at most ``count``
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event) -> bool:
        while not self._free.acquire(timeout=0.05):
            if stop.is_set():
                return False
        with self._lock:
            self.taken += 1
            self.most_taken = max(self.most_taken, self.taken)
        return True

    def put(self, item: Any) -> None:
        self._ready.put(item)

    def get(self, stop: threading.Event) -> Any:
        while True:
            try:
                return self._ready.get(timeout=0.05)
            except queue.Empty:
                if stop.is_set():
                    return _END

    def release(self) -> None:
        with self._lock:
            self.taken -= 1
        self._free.release()


class Actor:
    """A thread that maps each item of its input (an iterable, or another actor's registers) through ``task``.

    The task runs after an output register is acquired, so with an iterable of cheap tickets (indices) the
    real work (a file read) never runs ahead of the registers. A task raising ``StopIteration`` ends the
    actor like the end of its input (for a reader whose task is ``next(iterator)``).
    """

    def __init__(
        self,
        name: str,
        task: Callable[[Any], Any],
        registers: int,
        source: Iterable[Any] | Actor,
        stop: threading.Event,
        events: list[Event],
        rank: int = 0,
    ) -> None:
        self.name, self.task, self.source, self.stop, self.events, self.rank = name, task, source, stop, events, rank
        self.out = Registers(registers, name)
        self.thread = threading.Thread(target=self._loop, name=f"sf-actor-{name}", daemon=True)

    def start(self) -> Actor:
        self.thread.start()
        return self

    def _inputs(self) -> Iterator[tuple[Any, Callable[[], None]]]:
        """Items with the call that frees the register they came in (nothing to free from an iterable)."""
        if isinstance(self.source, Actor):
            upstream = self.source.out
            while True:
                item = upstream.get(self.stop)
                if item is _END or isinstance(item, _Failure):
                    if isinstance(item, _Failure):
                        self.out.put(item)  # pass the failure down to the consumer
                    return
                yield item, upstream.release
        else:
            for item in self.source:
                yield item, lambda: None

    def _loop(self) -> None:
        index = 0
        try:
            for item, free in self._inputs():
                if not self.out.acquire(self.stop):
                    return
                start = time.time_ns()
                try:
                    result = self.task(item)
                except StopIteration:
                    self.out.release()
                    break
                finally:
                    free()  # the input register is free once the task has made its output
                self.events.append(Event(self.rank, self.name, f"{self.name} {index}", start, time.time_ns()))
                self.out.put(result)
                index += 1
                if self.stop.is_set():
                    return
        except BaseException as exc:  # reported by the consumer, which names this actor
            self.out.put(_Failure(self.name, exc))
            return
        self.out.put(_END)


class Chain:
    """Actors in a line; iterating yields the last actor's items, freeing each one's register at the next."""

    def __init__(self, actors: list[Actor], after_close: Callable[[], None] | None = None) -> None:
        self.actors = actors
        self.stop = actors[0].stop
        self._held = False
        self._after_close = after_close  # releases what the actors used (a reader's thread pool)

    def __iter__(self) -> Iterator[Any]:
        last = self.actors[-1].out
        try:
            while True:
                if self._held:
                    last.release()  # the consumer is done with the item it took before
                    self._held = False
                item = last.get(self.stop)
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise ActorError(f"actor {item.actor!r} failed: {item.error!r}") from item.error
                self._held = True
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop every actor and wait for its thread (a thread blocked on a register notices within 50 ms)."""
        self.stop.set()
        for actor in self.actors:
            if actor.thread.is_alive() and actor.thread is not threading.current_thread():
                actor.thread.join(timeout=5)
        if self._after_close is not None:
            self._after_close()
            self._after_close = None
