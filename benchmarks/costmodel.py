"""Cost-model benchmark: ``plan.estimate``'s step time and peak memory against measured steps, and how fast it
prices plans.

Accuracy: plans of ``memory_case``'s GPT, MLP and CNN, priced by an ``Estimator`` on this machine's profile for
the run's rank count (``calibrate(ranks=N)``, saved and passed as ``device=``), then compiled and stepped on N
pooled gloo ranks with the launcher's threads for N ranks. Time: after a warm-up, the plans of a rank count take
turns in rotating order, each a block of one untimed and 4 timed steps (a job runs one plan over and over; the
untimed step finds the caches full of the previous plan's data), a barrier before each timed step, each step's
slowest rank kept, the median over steps.
Memory: the second step's peak by the allocator (``predict_and_measure``), the fullest rank. Pipeline plans are
"not priced yet" while ``estimate`` raises NotImplementedError. The worst-timed plan of each model: its
``StepTime`` against torch.profiler (ATen ops) and cProfile (gloo), term by term and op by op.
Pricing speed: GPT-2 124M on the meta device, candidate plans on virtual meshes of 8 to 1,024 H100s.

    .venv/bin/python benchmarks/costmodel.py [--ranks 1,2 | --ranks 4] [--steps 40] [--quick] [--markdown]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks.common import print_preamble, print_table, timed_call  # noqa: E402
from shardflow.testing.memory_cases import MemoryCase  # noqa: E402

KINDS = ("gpt", "mlp", "cnn")
BLOCK = 4  # timed steps of a plan in a row, after one untimed
HEADER = ["plan", "ranks", "predicted ms", "measured ms", "time err %", "predicted MiB", "measured MiB", "mem err %"]


def plans(world: int) -> list[MemoryCase]:
    """The plans measured on ``world`` ranks."""
    if world == 1:
        return [MemoryCase(k, (1,), ("dp",)) for k in KINDS]
    if world == 2:
        out = []
        for k in KINDS:
            out += [MemoryCase(k, (2,), ("dp",)), MemoryCase(k, (2,), ("tp",), "tp")]
            out += [MemoryCase(k, (2,), ("dp",), zero=z) for z in (1, 2, 3)]
        return out + [
            MemoryCase("gpt", (2,), ("dp",), recompute=True),
            MemoryCase("gpt", (2,), ("pp",), schedule="1f1b"),
        ]
    if world == 4:
        hybrid = [MemoryCase(k, (2, 2), ("dp", "tp"), "hybrid") for k in KINDS]
        return hybrid + [MemoryCase(k, (4,), ("dp",)) for k in KINDS]
    raise SystemExit(f"--ranks: 1, 2 or 4, got {world}")


def _options(case: MemoryCase) -> dict[str, Any]:
    """``sf.compile``/``sf.plan`` keywords of ``case`` (as ``predict_and_measure`` builds them)."""
    import shardflow as sf

    options: dict[str, Any] = {"strategy": case.strategy, "zero": case.zero, "recompute": case.recompute}
    if case.schedule:
        options["pipeline"] = sf.Pipeline(axis="pp", micro_batches=case.micro_batches, schedule=case.schedule)
    return options


def _built(case: MemoryCase, virtual: bool = False) -> tuple[Any, Any, Any]:
    """(model, batch, module or plan) of ``case``: compiled on the ranks, or a plan on a virtual mesh."""
    import shardflow as sf
    from shardflow.testing.memory import memory_case

    model, data = memory_case(case.kind)
    mesh = sf.Mesh("cpu", case.shape, names=case.names, virtual=virtual)
    build = sf.plan if virtual else sf.compile
    return model, data, build(model, mesh, data, **_options(case))


# ------------------------------------------------------------------------------------------- on the ranks


def measure(cases: list[MemoryCase], threads: int, steps: int, warmup: int) -> tuple[list[Any], tuple[float, float]]:
    """On every rank: each case's peak (allocator), then its steps timed, the cases taking turns in blocks of
    steps; and the timing's seconds and the cores other processes kept busy meanwhile."""
    import torch.distributed as dist

    from shardflow.runtime.meter import rank_threads
    from shardflow.testing.memory_cases import predict_and_measure

    with rank_threads(threads):  # the launcher's share for this many ranks, as the profile was measured
        peaks = [predict_and_measure(c).measured for c in cases]
        built = [_built(c)[1:] for c in cases]
        for data, pm in built:
            for _ in range(warmup):
                pm.step(*data)
        times: list[list[float]] = [[] for _ in cases]
        before, start = _cpu_seconds(os.getppid()), time.perf_counter()  # the parent's tree: every rank
        for i in range(math.ceil(steps / BLOCK)):  # rotating order: drift hits every plan alike
            for j in [(i + k) % len(cases) for k in range(len(cases))]:
                data, pm = built[j]
                pm.step(*data)  # untimed: it finds the caches full of the previous plan's data
                for _ in range(BLOCK):  # then steady steps, as a job runs one plan over and over
                    times[j].append(timed_call(lambda pm=pm, data=data: pm.step(*data)))  # the slowest rank's
        seconds = time.perf_counter() - start
        total, mine = (a - b for a, b in zip(_cpu_seconds(os.getppid()), before))
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, peaks)
    got = [{"times": times[j], "peak": max(e[j] for e in every)} for j in range(len(cases))]
    return got, (seconds, (total - mine) / seconds)


def diagnose(case: MemoryCase, threads: int, device: str, steps: int = 10) -> dict[str, Any]:
    """On every rank, per step: torch.profiler's self CPU seconds and calls per op, the optimizer's total, and
    (under cProfile, another window) the seconds in gloo's calls and waits; beside them the predicted seconds
    of this rank's program ops of the same name. The slowest rank's answer is kept."""
    import cProfile
    import pstats

    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from shardflow.cost.profile import device_profile
    from shardflow.graph.ir.instr import Op
    from shardflow.graph.step_time import op_seconds
    from shardflow.runtime.meter import rank_threads

    with rank_threads(threads):
        _, data, pm = _built(case)
        run = functools.partial(_per_step, pm, data, steps)
        run()  # warm-up
        dist.barrier()
        wall = run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profiled = run()
        events = prof.key_averages()
        ops = {e.key: (e.count / steps, e.self_cpu_time_total / 1e6 / steps) for e in events}
        updates = [e for e in events if e.key.startswith("Optimizer.step")]
        optimizer = sum(e.cpu_time_total for e in updates) / 1e6 / steps
        inside = optimizer - sum(e.self_cpu_time_total for e in updates) / 1e6 / steps  # its ATen ops
        dist.barrier()
        cprof = cProfile.Profile()
        share = 1 / cprof.runcall(run)
        stats = pstats.Stats(cprof).stats  # type: ignore[attr-defined]
        share *= sum(v[2] for (_, _, fn), v in stats.items() if "_distributed_c10d" in fn) / steps
        profile_ = device_profile(device)
        predicted: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for ins in pm.program(pm._inputs(data)).ir.body:
            if isinstance(ins, Op):
                name = (ins.work.op if ins.work else ins.op.rsplit(".", 1)[0]).replace(".", "::")
                predicted[name][0] += 1
                predicted[name][1] += op_seconds(ins.work, profile_)
    mine = {"rank": dist.get_rank(), "wall": wall, "profiled": profiled, "ops": ops, "optimizer": optimizer}
    mine |= {"inside": inside, "gloo": share * wall}  # gloo's share of the step under cProfile, of a plain step
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, {**mine, "predicted": dict(predicted)})
    return max(every, key=lambda r: r["wall"])


def _per_step(pm: Any, data: Any, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        pm.step(*data)
    return (time.perf_counter() - start) / steps


# ------------------------------------------------------------------------------------------- in the parent


def calibrated(worlds: list[int], quick: bool, where: Path) -> dict[int, str]:
    """This machine's profile for each rank count, saved under ``where``: rank count -> path."""
    from shardflow.cli.calibrate import calibrate
    from shardflow.cost.profile import save

    return {n: str(save(calibrate(ranks=n, quick=quick), where / f"ranks{n}.json")) for n in worlds}


def priced(cases: list[MemoryCase], device: str) -> list[Any]:
    """Each case's ``Estimate`` on ``device`` (None: not priced yet), one ``Estimator`` per model."""
    from shardflow.graph.estimate import Estimator

    estimators: dict[str, Estimator] = {}
    out = []
    for case in cases:
        model, data, plan = _built(case, virtual=True)
        est = estimators.setdefault(case.kind, Estimator(model, data, device=device))
        try:
            out.append(est(plan))
        except NotImplementedError:
            out.append(None)
    return out


def accuracy(world: int, device: str, steps: int, warmup: int) -> list[dict[str, Any]]:
    """One row per plan of ``world`` ranks: predicted and measured time and peak."""
    from shardflow.cli.launch import _threads_per_worker
    from shardflow.testing import run_on_ranks

    me = importlib.import_module("benchmarks.costmodel")  # the ranks import it by this name
    cases = plans(world)
    threads = _threads_per_worker(world)
    got, (seconds, foreign) = run_on_ranks(world, me.measure, cases, threads, steps, warmup, timeout=3600)[0]
    foreign, noisy = max(foreign, 0.0), " (noisy: rerun on a quiet machine)" if foreign > 0.2 else ""
    print(f"{world} rank(s): timed for {seconds:.0f} s; other processes kept {foreign:.2f} cores busy{noisy}")
    rows = []
    for case, est, m in zip(cases, priced(cases, device), got):
        row = {"case": case, "world": world, "threads": threads, "est": est, "mib": m["peak"] / 2**20}
        row |= {"ms": statistics.median(m["times"]) * 1e3, "spread": _iqr(m["times"])}
        row |= {"pred_ms": est.step_seconds * 1e3, "pred_mib": max(est.peak_bytes) / 2**20} if est else {}
        rows.append(row)
    return rows


def _cpu_seconds(root: int) -> tuple[float, float]:
    """CPU seconds used so far by the whole machine and by process ``root`` and its descendants (/proc): what
    other jobs took from a measurement, the noise a load average only hints at."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        total = sum(int(v) for v in f.readline().split()[1:4]) / tick  # user, nice, system
    parent, cpu = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(pid)], cpu[int(pid)] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
    mine, grown = {root}, True
    while grown:
        new = {p for p, pp in parent.items() if pp in mine} - mine
        mine, grown = mine | new, bool(new)
    return total, sum(cpu[p] for p in mine)


def _iqr(ts: list[float]) -> float:
    q = statistics.quantiles(ts, n=4)
    return (q[2] - q[0]) / statistics.median(ts)


def _err(pred: float | None, meas: float) -> float | None:
    return None if pred is None else (pred / meas - 1) * 100


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _cells(r: dict[str, Any]) -> list[str]:
    te, me = _err(r.get("pred_ms"), r["ms"]), _err(r.get("pred_mib"), r["mib"])
    return [
        r["case"].name,
        f"{r['world']} ({r['threads']} thr)",
        f"{r['pred_ms']:.2f}" if te is not None else "not priced yet",
        f"{r['ms']:.2f} ±{r['spread'] * 50:.0f}%",
        f"{te:+.1f}" if te is not None else "",
        f"{r['pred_mib']:.2f}" if me is not None else "not priced yet",
        f"{r['mib']:.2f}",
        f"{me:+.1f}" if me is not None else "",
    ]


def summary(rows: list[dict[str, Any]], label: str) -> None:
    """MAE of time and memory, and Kendall's tau of predicted against measured step times."""
    from scipy.stats import kendalltau

    done = [r for r in rows if r["est"] is not None]
    if not done:
        return
    t_mae = statistics.mean(abs(_err(r["pred_ms"], r["ms"]) or 0.0) for r in done)
    m_mae = statistics.mean(abs(_err(r["pred_mib"], r["mib"]) or 0.0) for r in done)
    tau = kendalltau([r["pred_ms"] for r in done], [r["ms"] for r in done])
    per_model = []
    for kind in KINDS:
        mine = [r for r in done if r["case"].kind == kind]
        if len(mine) > 2:
            t = kendalltau([r["pred_ms"] for r in mine], [r["ms"] for r in mine]).statistic
            per_model.append(f"{kind} {t:.2f} ({len(mine)} plans)")
    skipped = len(rows) - len(done)
    print(
        f"\n{label}: {len(done)} plans priced ({skipped} not priced yet): time MAE {t_mae:.1f}%, memory MAE "
        f"{m_mae:.1f}%, Kendall's tau (predicted vs measured step time) {tau.statistic:.2f} (p={tau.pvalue:.2g}); "
        f"within each model: {', '.join(per_model) or 'too few plans'}"
    )


def worst(rows: list[dict[str, Any]], devices: dict[int, str], count: int, markdown: bool) -> None:
    """Each model's ``count`` plans priced furthest from their measured time: the predicted breakdown against the
    measured one term by term, then op by op."""
    from shardflow.cli.launch import _threads_per_worker
    from shardflow.testing import run_on_ranks

    me = importlib.import_module("benchmarks.costmodel")
    done = [r for r in rows if r["est"] is not None and not r["case"].schedule]  # a pipeline has no one program
    done.sort(key=lambda r: -abs(_err(r["pred_ms"], r["ms"]) or 0))
    for r in [r for k in KINDS for r in [r for r in done if r["case"].kind == k][:count]]:
        case, t = r["case"], max(r["est"].classes, key=lambda c: c.time.total).time
        print(f"\n#### {case.name}: predicted {r['pred_ms']:.2f} ms, measured {r['ms']:.2f} ms\n")
        print(f"predicted: {t.explain()}\n")
        d = run_on_ranks(r["world"], me.diagnose, case, _threads_per_worker(r["world"]), devices[r["world"]])[0]
        pred, ops = d["predicted"], d["ops"]
        program = sum(ops.get(k, (0, 0.0))[1] for k in pred)
        other = sum(s for k, (_, s) in ops.items() if k.startswith("aten::") and k not in pred) - d["inside"]
        rest = program + d["gloo"] + d["optimizer"] + other
        terms = [
            ("compute: the program's ATen ops", sum(s for _, s in pred.values()), program),
            ("communication (exposed; measured: gloo calls and waits)", t.exposed, d["gloo"]),
            ("update (measured: Optimizer.step)", t.update, d["optimizer"]),
            ("other ATen ops, not in the program (copies, casts)", None, other),
            (
                "the rest: Python and the runtime between ops (predicted: per step, per boxing)",
                t.runtime + t.boxing,
                d["wall"] - rest,
            ),
            ("step", t.total, d["wall"]),
        ]
        print(
            f"measured on rank {d['rank']} (the slowest), per step: {d['wall'] * 1e3:.2f} ms plain, "
            f"{d['profiled'] * 1e3:.2f} ms under torch.profiler (ATen ops' self time); gloo's share of a step "
            "under cProfile applied to the plain step:\n"
        )
        print_table(["term", "predicted ms", "measured ms"], [[n, _ms(p), _ms(m)] for n, p, m in terms], markdown)
        print()
        names = sorted(set(ops) | set(pred), key=lambda k: -max(ops.get(k, (0, 0.0))[1], pred.get(k, (0, 0.0))[1]))
        table = []
        for k in [k for k in names if "#" not in k][:10]:
            (mn, ms), (pn, ps) = ops.get(k, (0, 0.0)), pred.get(k, (0, 0.0))
            table.append([k, f"{mn:.0f}", f"{ms * 1e3:.3f}", f"{pn:.0f}", f"{ps * 1e3:.3f}"])
        print_table(["op", "profiled calls", "profiled self ms", "program ops", "predicted ms"], table, markdown)


def pricing_speed(quick: bool, markdown: bool) -> None:
    """GPT-2 124M's candidate plans on virtual meshes priced on H100 by one Estimator: seconds to build each
    plan (``sf.plan``) and to price it, the first plan apart (it traces), plans per second after it by mesh
    size, and the traces and lowerings it took."""
    import shardflow as sf
    from shardflow.graph.estimate import Estimator
    from shardflow.models import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    x = torch.empty(1024, 1024, dtype=torch.long, device="meta")  # 1,024 sequences of 1,024 tokens per step
    est = Estimator(model, (x, x), device="h100")
    dp = [("dp", {}), ("dp zero1", {"zero": 1}), ("dp zero2", {"zero": 2}), ("dp zero3", {"zero": 3})]
    dp.append(("dp recompute", {"recompute": True}))
    candidates = [(8, "tp8", (8,), ("tp",), {"strategy": "tp"})]
    for n in (8, 64) if quick else (8, 64, 512, 1024):
        candidates += [(n, name, (n,), ("dp",), o) for name, o in dp]
        for t, zero in ((2, 0), (4, 0), (4, 3)):
            name = f"hybrid dp{n // t}xtp{t}" + (f" zero{zero}" if zero else "")
            candidates.append((n, name, (n // t, t), ("dp", "tp"), {"strategy": "hybrid", "zero": zero}))
    rows, per_size, total = [], defaultdict(list), []
    for i, (n, name, shape, names, options) in enumerate(candidates):
        start = time.perf_counter()
        plan = sf.plan(model, sf.Mesh("cuda", shape, names=names, virtual=True), (x, x), **options)
        built = time.perf_counter()
        e = est(plan)
        seconds = (built - start, time.perf_counter() - built)
        total.append(sum(seconds))
        if i:
            per_size[n].append(sum(seconds))
        step, peak = f"{e.step_seconds * 1e3:.1f}", f"{max(e.peak_bytes) / 2**30:.2f}"
        rows.append([name, str(n), step, peak, f"{e.mfu:.1%}", f"{seconds[0]:.2f}", f"{seconds[1]:.2f}"])
    print_table(["plan", "devices", "step ms (H100)", "peak GiB", "MFU", "sf.plan s", "estimate s"], rows, markdown)
    rates = ", ".join(f"{n} devices {len(v) / sum(v):.2f}/s" for n, v in per_size.items())
    print(
        f"\n{len(candidates)} plans in {sum(total):.1f} s: the first {total[0]:.2f} s (it traces), then "
        f"{(len(total) - 1) / sum(total[1:]):.2f} plans/s (sf.plan and estimate; by mesh size: {rates}); "
        f"{est.traces} trace(s), {est.lowerings} lowering(s)"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts: 1, 2 and/or 4 (4: oversubscribed)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per plan after the warm-up")
    p.add_argument("--worst", type=int, default=1, help="worst-timed plans of each model to diagnose")
    p.add_argument("--quick", action="store_true", help="a smoke run: quick calibration, 5 steps, fewer candidates")
    p.add_argument("--no-speed", action="store_true", help="skip the pricing-speed table")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    from shardflow.cli.calibrate import table
    from shardflow.cost.profile import device_profile

    worlds = [int(v) for v in args.ranks.split(",")]
    steps, warmup = (5, 2) if args.quick else (args.steps, 5)
    print_preamble()
    with tempfile.TemporaryDirectory(prefix="sf-costmodel-") as tmp:
        devices = calibrated(worlds, args.quick, Path(tmp))
        for n, path in devices.items():
            text = table(device_profile(path))
            print(f"\nprofile for {n} rank(s):\n" + (f"```\n{text}\n```" if args.markdown else text))
        print()
        rows = [r for n in worlds for r in accuracy(n, devices[n], steps, warmup)]
        for oversubscribed in (False, True):
            mine = [r for r in rows if (r["world"] > 2) == oversubscribed]
            if mine:
                print(f"\n### {'4 ranks on 2 cores (oversubscribed)' if oversubscribed else '1 and 2 ranks'}\n")
                print_table(HEADER, [_cells(r) for r in mine], args.markdown)
        if args.worst:
            print("\n### Worst-timed plans\n")
            worst(rows, devices, args.worst, args.markdown)
    if not args.no_speed:
        print("\n### Pricing speed: GPT-2 124M on virtual H100 meshes\n")
        pricing_speed(args.quick, args.markdown)
    for oversubscribed in (False, True):
        mine = [r for r in rows if (r["world"] > 2) == oversubscribed]
        if mine:
            summary(mine, "4 ranks (oversubscribed)" if oversubscribed else "1-2 ranks")


if __name__ == "__main__":
    main()
