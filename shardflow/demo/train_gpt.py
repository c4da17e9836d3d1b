"""``shardflow demo``: train a small GPT on real text on local CPU ranks laid out as ``dp × tp``, and check it.

The text is Python's own standard-library source (``char_corpus``: every machine with Python has it, no
download), one token per byte. Every rank draws the same global batches (``batches`` with one seed) and
``sf.compile(..., strategy="hybrid")`` splits each batch over ``dp`` and the model's Megatron pairs over
``tp``. Rank 0 prints the plan, a progress bar with the loss, tokens/s, FLOP/s and MFU, and the loss at the
start and at the end. Before training, rank 0 trains a copy of the same model with plain PyTorch for the first
``CHECK_STEPS`` steps on the same batches (the test oracle: parallel must equal serial); every rank compares
its parallel losses with those, and the demo exits 1 if any differs by more than ``RTOL``. With
``--pipeline TRACE.json`` the mesh is two pipeline stages of data-parallel ranks (1F1B, 4 micro-batches)
instead, and one more step is traced into TRACE.json and drawn next to it as a PNG.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

import shardflow as sf
from shardflow.models import CHAR_VOCAB_SIZE, GPT, GPTConfig, batches, char_corpus

if TYPE_CHECKING:
    from rich.console import Console

Batch = tuple[torch.Tensor, torch.Tensor]

DEFAULT_STEPS = 30  # shardflow.cli.main.DEMO_STEPS says the same
CHECK_STEPS = 3  # steps compared with plain PyTorch
RTOL, ATOL = 1e-4, 1e-5  # the fp32 equality tolerances, as in tests/graph/test_compile.py
BATCH = 8  # global batch (sequences per step), split over dp
CONFIG = GPTConfig(vocab_size=CHAR_VOCAB_SIZE, block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
LR, EPS, MAX_GRAD_NORM = 3e-3, 1e-6, 1.0
MODEL_SEED, DATA_SEED = 0, 1
TP = 2  # the tp axis; dp takes the other ranks (2 of 4)
PP, MICRO_BATCHES = 2, 4  # with --pipeline: stages and micro-batches per step
TIMEOUT_S = 120  # per collective; far above a step of this model, so a slower one is a hang
PLAN_LINES = 24  # explain() lines shown (after collapsing repeated layers) before the rest is cut
RATE_WINDOW = 5  # tokens/s on the progress bar: over the last this many steps


def _optimizer(params: object) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, eps=EPS, foreach=False)  # type: ignore[arg-type]


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shardflow demo", add_help=False)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--pipeline", default="", metavar="TRACE.json")
    args = parser.parse_args(list(argv))
    if args.steps < CHECK_STEPS:
        parser.error(f"--steps must be at least {CHECK_STEPS} (the steps checked against serial PyTorch)")
    return args


def serial_losses(model: torch.nn.Module, data: Sequence[Batch]) -> list[float]:
    """Plain PyTorch on one process: the same optimizer, clipping and batches as the compiled model."""
    ref = copy.deepcopy(model)
    opt = _optimizer(ref.parameters())
    out = []
    for x, y in data:
        loss = ref(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_GRAD_NORM, foreach=False)
        opt.step()
        out.append(float(loss.item()))
    return out


def _plan_summary(text: str) -> str:
    """``pm.explain()``, with the layers after the first collapsed when they are laid out the same way."""
    lines = text.splitlines()
    first = [ln for ln in lines if ".h.0." in ln]
    kept, same = [], 0
    for ln in lines:
        if ".h." in ln and ".h.0." not in ln:
            layer = ln.split(".h.", 1)[1].split(".", 1)[0]
            if ln.replace(f".h.{layer}.", ".h.0.") in first:
                same += 1
                continue
        kept.append(ln)
    cut = max(0, len(kept) - PLAN_LINES)
    kept = kept[: len(kept) - cut]
    if same:
        kept.append(f"  (and {same} parameters of transformer.h.1, ... laid out like those of transformer.h.0)")
    if cut:
        kept.append(f"  ... {cut} more lines: print(pm.explain()) shows them all")
    return "\n".join(kept)


def _first_step_traffic(text: str) -> str | None:
    """The one-line summary of the first step (ops, boxing, bytes) from ``pm.explain()`` after a step."""
    lines = text.splitlines()
    for i, ln in enumerate(lines[:-1]):
        if ln.startswith("first step"):
            return lines[i + 1].strip()
    return None


def compare(got: Sequence[float], want: Sequence[float]) -> list[int]:
    """The 1-based steps whose parallel loss ``got`` is not within ``RTOL``/``ATOL`` of the serial ``want``."""
    if len(got) != len(want):
        raise ValueError(f"{len(got)} parallel losses but {len(want)} serial ones")
    return [i for i, (g, w) in enumerate(zip(got, want), 1) if not abs(g - w) <= ATOL + RTOL * abs(w)]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _header(console: Console, n_tokens: int, model: torch.nn.Module, dp: int, steps: int) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"[bold]A GPT learns Python[/] from the standard library's source ({n_tokens / 1e6:.1f} M bytes)")
    console.print(
        f"model: {CONFIG.n_layer} layers, {CONFIG.n_head} heads, width {CONFIG.n_embd}, one token per byte, "
        f"{n_params / 1e3:.0f} k parameters; AdamW lr {LR:g}, clip {MAX_GRAD_NORM:g}"
    )
    console.print(
        f"mesh: {dp * TP} CPU ranks (gloo) as dp × tp = {dp} × {TP}; "
        f"global batch {BATCH} × {CONFIG.block_size} tokens; {steps} steps"
    )


def _train(
    pm: sf.ParallelModule | sf.PipelineModule, data: Sequence[Batch], console: Console | None, meter: sf.Meter | None
) -> tuple[list[float], list[float]]:
    """Every step's loss and the time each step ended (seconds from the start); rank 0 shows the progress
    (tokens/s, FLOP/s and MFU by ``meter``)."""
    losses: list[float] = []
    ends: list[float] = []
    start = time.perf_counter()
    if console is None:
        for x, y in data:
            losses.append(pm.step(x, y))
            ends.append(time.perf_counter() - start)
        return losses, ends
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tokens_per_step = BATCH * CONFIG.block_size
    every = max(1, len(data) // 5)
    columns = (
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  {task.fields[speed]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=len(data), loss=math.nan, speed="")
        for step, (x, y) in enumerate(data, 1):
            losses.append(pm.step(x, y))
            ends.append(time.perf_counter() - start)
            window = ends[-RATE_WINDOW - 1 :] if step > 1 else [0.0, ends[0]]
            seconds = max(window[-1] - window[0], 1e-9)
            assert meter is not None  # rank 0 has both
            speed = str(meter.measure(seconds, steps=len(window) - 1, tokens=tokens_per_step))
            progress.update(task, advance=1, loss=losses[-1], speed=speed)
            if step % every == 0 or step in (1, CHECK_STEPS):
                progress.console.print(f"step {step:>4}  loss {losses[-1]:.4f}  {speed}")
    return losses, ends


def _summary(
    console: Console,
    losses: Sequence[float],
    ends: Sequence[float],
    want: Sequence[float],
    every_rank_ok: bool,
    meter: sf.Meter,
) -> None:
    k = max(1, min(5, len(losses) // 4))
    tokens_per_step = BATCH * CONFIG.block_size
    console.print(
        f"\nloss {_mean(losses[:k]):.3f} → {_mean(losses[-k:]):.3f} "
        f"(mean of the first {k} and of the last {k} of {len(losses)} steps)"
    )
    if len(ends) > 1:
        rate = meter.measure(ends[-1] - ends[0], steps=len(ends) - 1, tokens=tokens_per_step)
        console.print(
            f"{ends[-1]:.1f} s: step 1 took {ends[0]:.1f} s (it picks every op's layouts), the rest ran at {rate}"
        )
        console.print(f"peak of one device: {meter.peak.flops_per_s / 1e9:,.1f} GFLOP/s ({meter.peak.source})")
    bad = compare(losses[:CHECK_STEPS], want)
    if not bad and every_rank_ok:
        console.print(f"first {CHECK_STEPS} steps match serial PyTorch [green]✓[/] (losses within rtol {RTOL:g})")
        return
    if not bad:
        console.print(f"[red]✗ first {CHECK_STEPS} steps match serial PyTorch on rank 0 but NOT on another rank[/]")
        return
    console.print(f"[red]✗ first {CHECK_STEPS} steps do NOT match serial PyTorch[/] (rtol {RTOL:g}):")
    for i, (g, w) in enumerate(zip(losses, want), 1):
        mark = "  [red]✗[/]" if i in bad else ""
        console.print(f"  step {i}: shardflow {g:.6f}, serial PyTorch {w:.6f}{mark}")


def main() -> int:
    """The worker of ``shardflow demo``: run on every rank (``shardflow.cli.launch``); 1 if a check failed."""
    args = _parse(sys.argv[1:])
    sf.init(timeout=TIMEOUT_S)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size < 2 * TP or world_size % TP:
        raise ValueError(f"the GPT demo needs an even number (>= {2 * TP}) of ranks for dp × tp, got {world_size}")
    dp = world_size // TP
    # --pipeline: two stages (pp) of data-parallel ranks instead of dp × tp; the last step is traced
    pipelined = bool(args.pipeline)
    mesh = sf.Mesh(
        "cpu", (PP, world_size // PP) if pipelined else (dp, TP), names=("pp", "dp") if pipelined else ("dp", "tp")
    )

    torch.manual_seed(MODEL_SEED)  # every rank builds the same model ...
    model = GPT(CONFIG)
    tokens = char_corpus()
    stream = batches(tokens, BATCH, CONFIG.block_size, seed=DATA_SEED)  # ... and draws the same batches
    data = list(itertools.islice(stream, args.steps))

    # The oracle: rank 0 trains a plain PyTorch copy for the first steps; every rank gets its losses.
    want = torch.zeros(CHECK_STEPS, dtype=torch.float64)
    if rank == 0:
        want = torch.tensor(serial_losses(model, data[:CHECK_STEPS]), dtype=torch.float64)
    dist.broadcast(want, src=0)

    pm = sf.compile(
        model,
        mesh,
        example_inputs=data[0],
        strategy="dp" if pipelined else "hybrid",
        optimizer=_optimizer,
        max_grad_norm=MAX_GRAD_NORM,
        pipeline=sf.Pipeline(micro_batches=MICRO_BATCHES, schedule="1f1b") if pipelined else None,
    )
    console, meter = None, None
    if rank == 0:
        from rich.console import Console

        meter = sf.Meter.of(pm)  # the step's FLOPs counted from the plan, over the devices' peak

        console = Console(highlight=False)
        if not console.is_terminal:
            console.width = max(console.width, 120)  # pipes and logs: keep each line whole
        _header(console, tokens.numel(), model, dp, args.steps)
        console.print("\nThe plan (pm.explain()):")
        console.print(_plan_summary(pm.explain()), markup=False)
        console.print(
            f"\nrank 0 trained a plain PyTorch copy for {CHECK_STEPS} steps first (the oracle): losses "
            + ", ".join(f"{w:.4f}" for w in want.tolist())
        )
    losses, ends = _train(pm, data, console, meter)
    if pipelined:  # one more step, traced: every rank's timeline, drawn by rank 0
        pm.step(*data[-1], trace=args.pipeline)
        if console is not None:
            from shardflow.runtime.trace import idle_fraction, render

            png = args.pipeline.rsplit(".", 1)[0] + ".png"
            render(pm.events, png, title="shardflow demo --pipeline: one 1F1B step")
            console.print(
                f"\ntimeline of one step: {args.pipeline} (ui.perfetto.dev) and {png}; compute idle "
                f"{idle_fraction(pm.events):.0%} (2 stages, {MICRO_BATCHES} micro-batches: "
                f"{1 / (MICRO_BATCHES + 1):.0%} in theory)"
            )
    # Every rank checks its own losses; one all-reduce makes every rank agree on the exit code.
    ok = torch.tensor(int(not compare(losses[:CHECK_STEPS], want.tolist())), dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if console is not None:
        traffic = _first_step_traffic(pm.explain())
        if traffic:
            console.print(f"\nfirst step (pm.explain()): {traffic}", markup=False, soft_wrap=True)
        assert meter is not None
        _summary(console, losses, ends, want.tolist(), every_rank_ok=bool(ok), meter=meter)
    dist.destroy_process_group()
    return 0 if bool(ok) else 1
