"""Pipeline schedules: the order in which one stage runs forward (F) and backward (B) of each micro-batch.

A schedule is a per-stage list, fixed before the step: with it every stage knows which message comes next,
so sends and receives between neighbours match without a coordinator. Both schedules run micro-batches in
order in each direction, so activations (stage s to s+1) and gradients (s+1 to s) arrive in the order they
are sent. They differ in how many forwards a stage may run ahead of its backwards, which is the number of
activation sets it keeps alive (its registers, in the actor runtime's terms):

| schedule | order on stage ``s`` of ``p`` with ``m`` micro-batches          | activation sets alive |
|----------|------------------------------------------------------------------|-----------------------|
| gpipe    | ``F0 .. F(m-1)``, then ``B0 .. B(m-1)``                           | ``m``                 |
| 1f1b     | ``p-s-1`` forwards of warm-up, then one forward and one backward  | ``min(p - s, m)``     |
|          | in turn, then the remaining backwards                            |                       |

Both leave the same idle fraction when stages take equal time: ``(p - 1) / (m + p - 1)`` (``bubble``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from shardflow.plan import SCHEDULES

Kind = Literal["F", "B"]


@dataclass(frozen=True)
class Action:
    """Forward or backward of one micro-batch on one stage."""

    kind: Kind
    micro_batch: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.micro_batch}"


def stage_order(schedule: str, stage: int, stages: int, micro_batches: int) -> list[Action]:
    """The actions of ``stage`` (0-based, of ``stages``) in the order it runs them."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {SCHEDULES}")
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} out of range for {stages} stages")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    m = micro_batches
    if schedule == "gpipe":
        return [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)]
    warmup = min(stages - stage - 1, m)
    order = [Action("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [Action("F", warmup + i), Action("B", i)]
    order += [Action("B", i) for i in range(m - warmup, m)]
    return order


def in_flight(order: list[Action]) -> int:
    """The most micro-batches whose forward ran and whose backward did not yet (activation sets alive)."""
    alive = peak = 0
    for a in order:
        alive += 1 if a.kind == "F" else -1
        peak = max(peak, alive)
    return peak


def memory_peak(
    order: list[Action], act: int, grads: int, temps: int, accumulate: int = 0, tail: int = 0, split: bool = False
) -> tuple[int, Action, int, bool]:
    """The worst moment of one step's schedule for memory: ``(bytes, action, micro-batches in flight, whether
    the gradients exist)``, for activations of ``act`` bytes per micro-batch, gradients of ``grads`` bytes
    (made by the first backward: they are cleared at every step's start, then accumulated) and ``temps``
    bytes of temporaries while a backward runs (``accumulate`` more once gradients exist: adding a
    backward's gradients to them out of place; with ``split``, ``tail`` more during the step's last
    backward, run in two passes). The first backward ends with its own activations freed and every
    gradient made, unless it is also the last and split: its second pass makes the gradients with its
    activations still alive."""
    alive, made, best = 0, False, (0, order[0], 0, False)
    last = max(i for i, a in enumerate(order) if a.kind == "B") if any(a.kind == "B" for a in order) else -1
    for i, a in enumerate(order):
        if a.kind == "F":
            alive += 1
            moments = [(alive * act + (grads if made else 0), alive, made)]
        else:
            splits = split and i == last
            extra = tail if splits else 0
            moments = [(alive * act + temps + extra + (grads + accumulate if made else 0), alive, made)]
            if not made:
                after = alive if splits else alive - 1  # a split backward's activations outlive its gradients
                moments.append((after * act + grads, after, True))
            alive, made = alive - 1, True
        for nbytes, n, with_grads in moments:
            if nbytes > best[0]:
                best = (nbytes, a, n, with_grads)
    return best


def bubble(stages: int, micro_batches: int) -> float:
    """Idle fraction of each stage under GPipe or 1F1B when every stage's forward and backward take equal time."""
    return (stages - 1) / (micro_batches + stages - 1)


def simulate(
    schedule: str,
    stages: int,
    micro_batches: int,
    forward: float | Sequence[float] = 1.0,
    backward: float | Sequence[float] = 1.0,
    weights: float | Sequence[float] = 0.0,
) -> float:
    """Mean idle fraction of the stages when a forward takes ``forward`` and a backward ``backward`` (one
    time for all stages, or one per stage): the ideal for those times, with free messages and no overhead.

    Each stage runs its ``stage_order``; an action starts when the stage is free and its input exists (the
    activation from the stage before, the gradient from the stage after). With equal times this is
    ``bubble(stages, micro_batches)`` for both schedules (tests/runtime checks it). ``weights`` is the part
    of a stage's last backward that runs after its inputs' gradients are sent (the split of
    ``split_backward.py``; 0 on a stage that does not split): the stage before may start that much earlier.
    """
    fwd, bwd, span = _walk(schedule, stages, micro_batches, forward, backward, weights)
    return sum(1.0 - micro_batches * (f + b) / span for f, b in zip(fwd, bwd)) / stages


def makespan(
    schedule: str,
    stages: int,
    micro_batches: int,
    forward: Sequence[float],
    backward: Sequence[float],
    weights: float | Sequence[float] = 0.0,
) -> float:
    """Seconds from the first forward to the last backward of a step (``simulate``'s walk): what the cost
    model prices a pipeline's schedule at, bubbles included."""
    return _walk(schedule, stages, micro_batches, forward, backward, weights)[2]


def _walk(
    schedule: str,
    stages: int,
    micro_batches: int,
    forward: float | Sequence[float],
    backward: float | Sequence[float],
    weights: float | Sequence[float],
) -> tuple[list[float], list[float], float]:
    """Every stage's forward and backward times and the step's span, each action started as early as its
    stage and its input allow."""

    def per_stage(name: str, t: float | Sequence[float]) -> list[float]:
        times = [float(t)] * stages if isinstance(t, (int, float)) else [float(v) for v in t]
        if len(times) != stages or any(not v >= 0 for v in times):
            raise ValueError(f"{name} must be one time >= 0, or one per stage ({stages}), got {t!r}")
        return times

    fwd, bwd, tail = per_stage("forward", forward), per_stage("backward", backward), per_stage("weights", weights)
    if any(w > b for w, b in zip(tail, bwd)):
        raise ValueError(f"weights {weights!r} must not exceed the backward they are part of ({backward!r})")
    orders = [stage_order(schedule, s, stages, micro_batches) for s in range(stages)]
    last_backward = [max(i for i, a in enumerate(order) if a.kind == "B") for order in orders]
    finish: dict[tuple[int, Action], float] = {}
    clock, pos = [0.0] * stages, [0] * stages
    while any(pos[s] < len(orders[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if pos[s] == len(orders[s]):
                continue
            a = orders[s][pos[s]]
            dep = (s - 1, a) if a.kind == "F" and s > 0 else (s + 1, a) if a.kind == "B" and s < stages - 1 else None
            if dep is not None and dep not in finish:
                continue
            start = max(clock[s], finish[dep] if dep is not None else 0.0)
            clock[s] = start + (fwd[s] if a.kind == "F" else bwd[s])
            finish[(s, a)] = clock[s] - (tail[s] if pos[s] == last_backward[s] else 0.0)  # when it is handed on
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {schedule!r} deadlocks with {stages} stages, {micro_batches} micro-batches")
    return fwd, bwd, max(clock)
