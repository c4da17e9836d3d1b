"""A profile's in-step figures, fitted on real compiled steps of calibrate's own small models (never the cost-model
benchmark's): what a step costs beyond its ops timed alone and its links timed between idle ranks.

On one rank, a scale on the ops' times, a cost per program line and one per step, by least squares in relative
error with none negative (``runtime_fit``); on the job's pooled ranks, a cost per collective, a scale on its
bytes' time and a cost per synchronous boxing (``in_step_fit``), then on 2 a cost per pipeline action
(``pipeline_fit``), each found by a search because the estimate is only piecewise linear in them.
Decision: several models whose op time, line count and gradient size vary apart, since fitted on one family
(GPTs of one width) the scale and the per-line cost trade off and the fit mispriced wider models by 10-20%.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from shardflow.cost.profile import DeviceProfile
from shardflow.runtime.meter import rank_threads
from shardflow.runtime.pipeline_config import Pipeline
from shardflow.testing import run_on_ranks  # pooled ranks: a process group started once and kept warm

_PIPELINE = Pipeline(axis="pp", micro_batches=4, schedule="1f1b")  # the pipeline action's calibration


class OneRankFit(NamedTuple):
    kernel_scale: float  # an op's seconds inside a step over its seconds timed alone (or its roofline)
    launch: float  # seconds per program line beyond its op's own time
    step_overhead: float  # seconds per step beyond its lines


def runtime_fit(profile: DeviceProfile, quick: bool) -> OneRankFit:
    """What a real compiled step costs beyond its ops' times alone (measured or rooflines): a scale on those
    times (a step's ops find caches full of other ops' tensors; a tight loop finds its own), a cost per program
    line (Python, dispatch, wrapping, the update loop's calls: a bare one-element add, the floor, leaves them
    out) and one per step (staging inputs and the loss, bookkeeping). Fitted by least squares in relative
    error, none negative, on one-rank steps of models of their own (not ones the cost-model benchmark checks
    the fit on), chosen so that op time and line count vary apart: small and wide MLPs, GPTs of 1, 2 and 4
    layers, and wider GPTs on longer sequences."""
    import shardflow as sf
    from shardflow.graph.estimate import Estimator

    columns, measured = [], []
    for model, batch in map(_calibration_model, _RUNTIME_MODELS):
        pm = sf.compile(model, sf.Mesh("cpu", (1,)), batch)
        seconds = _steps(pm, batch, 5 if quick else 15, barrier=False)  # this process alone
        bare = dataclasses.replace(profile, kernel_scale=1.0, launch=0.0, step_overhead=0.0)
        estimator = Estimator(model, batch, device=bare)
        ops, unit = (estimator(pm.plan, dataclasses.replace(bare, launch=t)).step_seconds for t in (0.0, 1.0))
        columns.append((ops, unit - ops, 1.0))  # the estimate is linear in all three on one CPU rank
        measured.append(statistics.median(seconds))
    return OneRankFit(*_nonnegative_fit(np.array(columns), np.array(measured)))


_RUNTIME_MODELS = ("mlp", "mlp-wide", "gpt1", "gpt2", "gpt4", "gpt2-192", "gpt1-256")


def _calibration_model(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """One of calibrate's own models and its batch, none of the sizes the cost-model benchmark checks the fits
    on: MLPs (small, and wide with a large gradient), GPTs of 1, 2 and 4 layers of width 96 on 8 x 32 tokens,
    and wider GPTs on 8 x 64 tokens (``gpt2-192``: 2 layers of width 192)."""
    from shardflow.models import GPT, MLP, GPTConfig, MLPConfig

    torch.manual_seed(0)
    if name.startswith("mlp"):
        features, hidden, batch = (512, 2048, 128) if name == "mlp-wide" else (96, 192, 16)
        mlp = MLP(MLPConfig(in_features=features, hidden_sizes=(hidden,), num_classes=10))
        return mlp, (torch.randn(batch, features), torch.randint(0, 10, (batch,)))
    depth, _, wide = name[3:].partition("-")
    width, tokens = (int(wide), 64) if wide else (96, 32)
    data = torch.randint(0, 512, (8, tokens))
    config = GPTConfig(vocab_size=512, block_size=tokens, n_layer=int(depth), n_head=max(width // 64, 2), n_embd=width)
    return GPT(config), (data, data)


def _nonnegative_fit(columns: np.ndarray, measured: np.ndarray) -> tuple[float, ...]:
    """The coefficients, none negative and the first (the op-time scale) never 0, that bring ``columns @ x``
    closest to ``measured`` in relative error: least squares on each subset of the other columns (the rest 0),
    the best one whose coefficients are all non-negative (with three columns, four small solves)."""
    weighted, target = columns / measured[:, None], np.ones(len(measured))
    best: tuple[float, np.ndarray] | None = None
    for rest in itertools.product((True, False), repeat=columns.shape[1] - 1):
        kept = [0] + [i + 1 for i, keep in enumerate(rest) if keep]
        x = np.zeros(columns.shape[1])
        x[kept] = np.linalg.lstsq(weighted[:, kept], target, rcond=None)[0]
        error = float(np.sum((weighted @ x - target) ** 2))
        if (x >= 0).all() and x[0] > 0 and (best is None or error < best[0]):
            best = (error, x)
    if best is None:
        raise RuntimeError("calibrate: no step fits a positive op-time scale; is another job loading this machine?")
    return tuple(float(v) for v in best[1])


class InStepCase(NamedTuple):
    """A plan the in-step costs are fitted on: one of calibrate's models, its mesh's shape and axis names, and
    its ``sf.compile`` options."""

    model: str
    shape: tuple[int, ...]
    names: tuple[str, ...]
    options: dict[str, Any]


def in_step_cases(ranks: int) -> tuple[InStepCase, ...]:
    """The plans fitted on for a job of ``ranks`` ranks, on all of them (so links, contention and the waiting
    partners are the job's): few collectives and many (ZeRO-3's gathers), a large gradient, and blocking ones
    inside the program (tensor parallel: on 2 ranks alone, above that beside data parallel, a pair per group)."""
    dp = ((ranks,), ("dp",))
    tp = ((2,), ("tp",), {"strategy": "tp"}) if ranks == 2 else ((ranks // 2, 2), ("dp", "tp"), {"strategy": "hybrid"})
    cases = [InStepCase("gpt2", *dp, {}), InStepCase("gpt2", *dp, {"zero": 3}), InStepCase("mlp-wide", *dp, {})]
    if ranks % 2 == 0:
        cases += [InStepCase("gpt2", *tp), InStepCase("mlp-wide", *tp)]
    return tuple(cases)


LINK_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)  # the scales on a collective's bytes the search starts from


class StepLinks(NamedTuple):
    in_step: float  # seconds each collective costs inside a step beyond its link fit
    link_scale: float  # a collective's bytes inside a step take this many times their link-fit time
    box_overhead: float  # seconds a synchronous boxing costs the compute clock beyond its collective


def in_step_fit(profile: DeviceProfile, quick: bool, ranks: int = 2) -> StepLinks:
    """What collectives cost inside real steps beyond their link fits: a cost per collective (the runtime's
    packing and handles, the waiting rank's wake-up), a scale on their bytes' time (gloo's threads share the
    cores the step computes on, which the link fits, timed between idle ranks, never see), and a cost per
    synchronous boxing on the compute clock (the boxing runtime's Python; the partner that arrives late).
    Fitted on real steps on ``ranks`` ranks of calibrate's models (``in_step_cases``) by nested searches
    (``_search``): each scale tried (``LINK_SCALES``, then golden section) searches the boxing cost, and each
    of those ``_solve``s the per-collective cost; the triple closest to the measurements in relative error
    wins. Each is bounded (the scale by ``LINK_SCALES``, 3 in a quick calibration; the costs by ``_costs``'
    5 ms): a fit at a bound means the model misses something on this machine. Replaces the between-compute
    microbenchmark's figure, which leaves out the runtime."""
    import shardflow as sf
    from shardflow.graph.estimate import Estimator

    cases = in_step_cases(ranks)
    per_rank = run_on_ranks(ranks, _plan_steps, cases, 5 if quick else 15, profile.threads, timeout=600)
    measured = [statistics.median(max(s) for s in zip(*steps)) for steps in zip(*per_rank)]
    estimators: dict[str, Estimator] = {}  # one per model: its step traced once for all its plans
    priced = []
    for case in cases:
        model, batch = _calibration_model(case.model)
        plan = sf.plan(model, sf.MeshSpec("cpu", case.shape, case.names, tuple(range(ranks))), batch, **case.options)
        priced.append((estimators.setdefault(case.model, Estimator(model, batch, device=profile)), plan))
    found: dict[tuple[float, float], tuple[float, float]] = {}  # (scale, boxing) -> (error, per-collective)

    def with_costs(scale: float, box: float) -> float:
        def estimates(t: float) -> list[float]:
            changed = dataclasses.replace(profile, in_step=t, link_scale=scale, box_overhead=box)
            return [estimator(plan, changed).step_seconds for estimator, plan in priced]

        found[scale, box] = _solve(estimates, measured, quick)
        return found[scale, box][0]

    def with_scale(scale: float) -> float:
        return _search(functools.partial(with_costs, scale), _costs(quick), 3 if quick else 6)[0]

    _search(with_scale, LINK_SCALES[:4] if quick else LINK_SCALES, 2 if quick else 5)
    (scale, box), (_, t) = min(found.items(), key=lambda kv: kv[1][0])
    return StepLinks(t, scale, box)


def _plan_steps(cases: tuple[InStepCase, ...], steps: int, threads: int) -> list[list[float]]:
    """On every rank of a pool: per case, the seconds of ``steps`` steps of its model compiled on its mesh with
    its options, after a warm-up, a barrier before each."""
    import shardflow as sf

    out = []
    with rank_threads(threads):
        for case in cases:
            model, batch = _calibration_model(case.model)
            pm = sf.compile(model, sf.Mesh("cpu", case.shape, names=case.names), batch, **case.options)
            out.append(_steps(pm, batch, steps))
    return out


def _steps(pm: Any, batch: tuple[torch.Tensor, ...], steps: int, barrier: bool = True) -> list[float]:
    """The seconds of ``steps`` steps of ``pm`` after a warm-up, a barrier of the pool before each (on ranks)."""
    for _ in range(3):
        pm.step(*batch)
    seconds = []
    for _ in range(steps):
        if barrier:
            dist.barrier()
        started = time.perf_counter()
        pm.step(*batch)
        seconds.append(time.perf_counter() - started)
    return seconds


def pipeline_fit(profile: DeviceProfile, quick: bool) -> float:
    """Seconds each pipeline action (a micro-batch's forward or backward on a stage) costs beyond its program
    and its messages: the schedule's bookkeeping, autograd's engine. Fitted on a real 2-stage 1F1B step of a
    small GPT on 2 pooled ranks (``_solve``)."""
    import shardflow as sf
    from shardflow.graph.estimate import Estimator

    measured = statistics.median(
        max(s) for s in zip(*run_on_ranks(2, _pipeline_steps, 5 if quick else 15, profile.threads))
    )
    model, batch = _calibration_model("gpt2")
    plan = sf.plan(model, sf.MeshSpec("cpu", (2,), ("pp",), (0, 1)), batch, pipeline=_PIPELINE)

    estimator = Estimator(model, batch, device=profile)

    def estimate(t: float) -> list[float]:
        return [estimator(plan, dataclasses.replace(profile, pipeline_action=t)).step_seconds]

    return _solve(estimate, [measured], quick)[1]


def _solve(estimates: Callable[[float], list[float]], measured: list[float], quick: bool) -> tuple[float, float]:
    """``(error, t)``: the ``t`` in ``_costs`` (0 to 5 ms) at which ``estimates(t)`` comes closest to ``measured`` in relative
    error (each plan counts alike, whatever its size): ``_search`` from a geometric grid. A search, not a
    slope: the estimate grows piecewise linearly in ``t`` (faster once a cost stops hiding behind compute), so
    the error need not be convex, and a slope at one point can miss where another plan's cost starts to show."""
    return _search(lambda t: _relative_error(estimates(t), measured), _costs(quick), 4 if quick else 10)


def _costs(quick: bool, most: float = 5e-3) -> list[float]:
    """A geometric grid of costs in seconds, 0 and ``most`` / 4^k: where searches for a cost start."""
    return [0.0] + [most / 4**k for k in range(4 if quick else 7, -1, -1)]


def _search(error: Callable[[float], float], grid: Sequence[float], rounds: int) -> tuple[float, float]:
    """``(error, point)`` where ``error`` is least: the best of ``grid`` (ascending), then ``rounds`` of
    golden-section search between its neighbours, each round reusing the point the last one kept; the best
    point tried."""
    tried = [(error(t), t) for t in grid]
    k = min(range(len(grid)), key=lambda i: tried[i][0])
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    ratio = (5**0.5 - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = error(a), error(b)
    for _ in range(rounds):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = error(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = error(b)
    return min([*tried, (fa, a), (fb, b)])


def _relative_error(estimates: Sequence[float], measured: Sequence[float]) -> float:
    return float(sum(((e - m) / m) ** 2 for e, m in zip(estimates, measured)))


def _pipeline_steps(steps: int, threads: int) -> list[float]:
    """On every rank of a pool: the seconds of ``steps`` steps of ``pipeline_fit``'s pipeline (after a warm-up)."""
    import shardflow as sf

    with rank_threads(threads):
        model, batch = _calibration_model("gpt2")
        return _steps(sf.compile(model, sf.Mesh("cpu", (2,), names=("pp",)), batch, pipeline=_PIPELINE), batch, steps)
