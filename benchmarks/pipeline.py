"""Pipeline benchmark: ``sf.compile(..., pipeline=sf.Pipeline(...)).step`` against torch.distributed.pipelining
(``ScheduleGPipe`` / ``Schedule1F1B`` over ``PipelineStage``s of the same cut), and shardflow's bubble
against the formula ``(p - 1) / (m + p - 1)``.

The model is an MLP of equal layers (``--width`` wide, ``--layers`` Linear+ReLU pairs, then a classifier),
so equal stages are a fair test of the bubble, or with ``--model gpt`` shardflow's GPT (``--layers`` blocks
of ``--width``, ``--seq`` tokens; torch's stages run it returning logits), cut before equal numbers of
blocks. Both sides cut it before the same layers, start from the same weights, use AdamW(lr=1e-3,
foreach=False) and the same micro-batches; torch computes the loss with ``loss_fn`` on the last stage,
shardflow inside the last stage (the model's forward returns it). Before timing, the first two steps of
both must give the same losses (rtol 1e-4; the GPT's tied embedding and head, which torch replicates into
two stages and leaves to the user, get their gradients summed on torch's side as on shardflow's).

Sides, interleaved (each first in turn; each timed step starts after a barrier and counts the slowest
rank; medians): shardflow; torch as it runs its stages (torch.export's outlined modules interpret their
graphs node by node, ``fx.Interpreter``); the same torch stages running their generated code, as
shardflow's do (``runtime/stages.py``), so "torch gen./sf" compares the runtimes alone; and shardflow with
every backward in one pass (``pm.split_backward = False``: the last backward's input gradients sent after
its weights', as torch's GPipe and 1F1B do), so "one-pass/split" is what the split of the last backward
(``runtime/split_backward.py``) gains. The bubble column is the mean idle fraction of the compute track of
shardflow's traced steps (message waits count as idle), the median over ``--traced`` steps; beside it, the
idle fraction an ideal runtime would have with the same measured forward, backward and weights'-pass
times per stage (``schedule.simulate``: no message costs, no overhead), and the formula for equal stages.

With ``--device-ms T`` the equal layers are ``DeviceLinear``s (``benchmarks/device_time.py``): each takes T
ms forward and 2T backward (T of it the weight gradient's) as a device's kernels would, the host thread
waiting with its core free. CPU stages on this 2-core machine take each other's cores; these do not, so
the bubble measured this way is the runtime's and the messages', as with one accelerator per stage.

    .venv/bin/python benchmarks/pipeline.py [--ranks 2,4] [--micro-batches 4,8] [--repeats 20] [--markdown]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as tmp
import torch.nn.functional as F
from torch import nn

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks.common import (  # noqa: E402
    free_port,
    print_preamble,
    print_table,
    rank_session,
    run_world,
    spread,
    timed_call,
)
from benchmarks.device_time import DeviceLinear  # noqa: E402

VOCAB = 256  # the GPT's
HEADER = [
    "case",
    "ranks",
    "shardflow ms",
    "torch.pipelining ms",
    "torch/sf (>1: sf faster)",
    "noise sf/torch",
    "torch, generated code ms",
    "torch gen./sf",
    "sf one-pass backward ms",
    "one-pass/split",
    "bubble measured",
    "ideal for measured F/B/W",
    "(p-1)/(m+p-1)",
]


class Body(nn.Module):
    """Equal Linear+ReLU layers and a classifier: what torch's stages run (loss outside, in ``loss_fn``).
    With ``device_ms``, the equal layers take their time as a device's kernels would (``DeviceLinear``)."""

    def __init__(self, width: int, layers: int, classes: int, device_ms: float = 0.0) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        for _ in range(layers):
            linear = nn.Linear(width, width) if device_ms <= 0 else DeviceLinear(width, width, device_ms)
            mods += [linear, nn.ReLU()]
        self.layers = nn.Sequential(*mods, nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GPTBody(nn.Module):
    """shardflow's GPT returning its logits (torch's stages run this; the loss outside, in ``loss_fn``)."""

    def __init__(self, width: int, layers: int, seq: int) -> None:
        super().__init__()
        from shardflow.models import GPT, GPTConfig

        self.gpt = GPT(GPTConfig(vocab_size=VOCAB, block_size=seq, n_layer=layers, n_head=4, n_embd=width))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt.logits(idx)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy over every position: (rows, classes) for the MLP, (rows, seq, vocab) for the GPT."""
    return F.cross_entropy(out.flatten(0, -2), target.flatten())


class WithLoss(nn.Module):
    """The same layers, returning the loss, as every model given to ``sf.compile`` does."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _loss(self.body(x), y)


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, foreach=False)


def _bench(k: int, schedule: str, m: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline

    import shardflow as sf
    from shardflow.runtime.stages import run_generated_code
    from shardflow.runtime.trace import idle_fraction

    rank = dist.get_rank()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    per = args.layers // k  # equal stages: each starts with a Linear, or a block
    body: nn.Module
    if args.model == "gpt":
        body = GPTBody(args.width, args.layers, args.seq)
        x = torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen)
        y = torch.roll(x, -1, 1)
        points = [f"gpt.transformer.h.{per * s}" for s in range(1, k)]
    else:
        body = Body(args.width, args.layers, 16, args.device_ms)
        x = torch.randn(args.batch, args.width, generator=gen)
        y = torch.randint(0, 16, (args.batch,), generator=gen)
        points = [f"layers.{2 * per * s}" for s in range(1, k)]
    # shardflow
    pm = sf.compile(
        WithLoss(copy.deepcopy(body)),
        sf.Mesh("cpu", (k,), names=("pp",)),
        example_inputs=(x, y),
        optimizer=_adamw,
        pipeline=sf.Pipeline(split_points=tuple(f"body.{p}" for p in points), micro_batches=m, schedule=schedule),
    )
    # torch.distributed.pipelining on the same cut: its stages as it runs them (fx.Interpreter), and the same
    # stages running their generated code as shardflow's do (runtime/stages.py)
    kinds = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    # torch REPLICATEs a weight two stages use (the GPT's tied embedding and head) and leaves summing their
    # gradients to the user: sum them between the first and last stage, so both sides train the same model
    tied_group = dist.new_group([0, k - 1]) if args.model == "gpt" else None

    def torch_side(generated: bool) -> Any:
        pipe = pipeline(
            copy.deepcopy(body), mb_args=(x.chunk(m)[0],), split_spec={p: SplitPoint.BEGINNING for p in points}
        )
        module = pipe.get_stage_module(rank)
        if generated:
            run_generated_code(module)
        stage = PipelineStage(module, rank, k, torch.device("cpu"))
        opt = _adamw(stage.submod.parameters())
        sched = kinds[schedule](stage, n_microbatches=m, loss_fn=_loss)
        # the copy each end uses: stage 0 also holds an unused copy of the head (torch's cut keeps it there)
        used = "wte.weight" if rank == 0 else "lm_head.weight"
        tied = [p for n, p in stage.submod.named_parameters() if n.endswith(used)]
        if tied_group is None or rank not in (0, k - 1):
            tied = []

        def step() -> float:
            opt.zero_grad()
            losses: list[torch.Tensor] = []
            if rank == 0:
                sched.step(x)
            elif rank == k - 1:
                sched.step(target=y, losses=losses)
            else:
                sched.step()
            for t in tied:
                dist.all_reduce(t.grad, group=tied_group)
            opt.step()
            total = torch.stack(losses).detach().mean() if losses else torch.zeros(())
            dist.all_reduce(total)  # the loss on every rank, as pm.step gives it
            return float(total)

        return step

    torch_step, torch_generated = torch_side(False), torch_side(True)

    def sf_step() -> float:
        pm.split_backward = True
        return pm.step(x, y)

    def sf_one_pass() -> float:  # the same runtime, every backward in one pass (its input gradients sent after)
        pm.split_backward = False
        return pm.step(x, y)

    for i in range(2):  # the first two steps' losses agree: the same model, the same update
        a, b, c = sf_step(), torch_step(), torch_generated()
        if max(abs(a - b), abs(a - c)) > 1e-4 * abs(b) + 1e-6:
            raise SystemExit(f"{schedule} m={m} on {k} ranks: losses of step {i} differ: shardflow {a}, torch {b}, {c}")
    for _ in range(args.warmup):
        sf_step(), sf_one_pass(), torch_step(), torch_generated()
    ts_sf, ts_one, ts_torch, ts_gen = [], [], [], []
    for i in range(args.repeats):
        sides = [(ts_sf, sf_step), (ts_one, sf_one_pass), (ts_torch, torch_step), (ts_gen, torch_generated)]
        for times, fn in sides[i % 4 :] + sides[: i % 4]:  # each side first in turn
            times.append(timed_call(fn))
    pm.split_backward = True
    idle, ideal = [], []
    with tempfile.TemporaryDirectory() as tmpdir:
        for i in range(args.traced):
            dist.barrier()  # as timed steps: rank 0 writing the last trace must not delay this one's start
            pm.step(x, y, trace=args.save_trace if args.save_trace and i == 0 else os.path.join(tmpdir, f"{i}.json"))
            idle.append(idle_fraction(pm.events))
            ideal.append(_ideal(pm.events, schedule, k, m))
    return {
        "case": f"{args.model}-{schedule}-m{m}",
        "k": k,
        "sf": statistics.median(ts_sf),
        "torch": statistics.median(ts_torch),
        "torch_generated": statistics.median(ts_gen),
        "one_pass": statistics.median(ts_one),
        "noise": (spread(ts_sf), spread(ts_torch)),
        "bubble": statistics.median(idle),
        "ideal": statistics.median(ideal),
        "theory": (k - 1) / (m + k - 1),
    }


def _ideal(events: list[Any], schedule: str, k: int, m: int) -> float:
    """The idle fraction the schedule would have with these ranks' measured forward and backward times and
    the weights' pass of a split last backward (a B median over the micro-batches stands for a whole one)."""
    from shardflow.runtime.schedule import simulate

    def median_ms(rank: int, kind: str) -> float:
        times = [e.end_ns - e.start_ns for e in events if e.rank == rank and e.track == "compute" and e.name[0] == kind]
        return statistics.median(times) if times else 0.0  # no "W": the stage did not split

    def per_rank(kind: str) -> list[float]:
        return [median_ms(r, kind) for r in range(k)]

    backward = per_rank("B")
    return simulate(schedule, k, m, per_rank("F"), backward, [min(w, b) for w, b in zip(per_rank("W"), backward)])


def _rank_main(rank: int, k: int, port: int, args: argparse.Namespace, q: Any) -> None:
    def work() -> list[dict[str, Any]]:
        return [_bench(k, s, m, args) for s in args.schedules for m in args.micro_batches]

    rank_session(rank, k, port, timedelta(seconds=600), q, work)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="2", help="comma-separated stage counts (one rank per stage)")
    p.add_argument("--micro-batches", default="4,8")
    p.add_argument("--schedules", default="gpipe,1f1b")
    p.add_argument("--model", choices=("mlp", "gpt"), default="mlp")
    p.add_argument("--width", type=int, default=512, help="the MLP's width, or the GPT's n_embd")
    p.add_argument("--seq", type=int, default=64, help="the GPT's sequence length")
    p.add_argument(
        "--layers", type=int, default=8, help="Linear+ReLU pairs (GPT blocks); a multiple of every stage count"
    )
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--traced", type=int, default=5)
    p.add_argument(
        "--device-ms",
        type=float,
        default=0.0,
        help="run each equal layer as a stand-in device would: this many ms forward, 2x backward, the CPU free",
    )
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--save-trace", default=None, help="keep one traced step's trace here (last case wins)")
    args = p.parse_args(argv)
    if args.model == "gpt" and args.device_ms:
        p.error("--device-ms stands in for the MLP's layers; the GPT runs its own ops")
    args.micro_batches = [int(v) for v in args.micro_batches.split(",")]
    args.schedules = args.schedules.split(",")
    print_preamble()
    rows = []
    for k in (int(v) for v in args.ranks.split(",")):
        q = tmp.get_context("spawn").SimpleQueue()
        for r in run_world(_rank_main, q, k, (k, free_port(), args, q)):
            rows.append(
                [
                    r["case"],
                    str(r["k"]),
                    f"{r['sf'] * 1e3:.1f}",
                    f"{r['torch'] * 1e3:.1f}",
                    f"{r['torch'] / r['sf']:.2f}",
                    f"{r['noise'][0]:.2f}/{r['noise'][1]:.2f}",
                    f"{r['torch_generated'] * 1e3:.1f}",
                    f"{r['torch_generated'] / r['sf']:.2f}",
                    f"{r['one_pass'] * 1e3:.1f}",
                    f"{r['one_pass'] / r['sf']:.2f}",
                    f"{r['bubble']:.3f}",
                    f"{r['ideal']:.3f}",
                    f"{r['theory']:.3f}",
                ]
            )
    print_table(HEADER, rows, args.markdown)


if __name__ == "__main__":
    main()
