"""``shardflow demo``: train a small GPT on real text on local CPU ranks laid out as ``dp × tp``, and check it.

The text is Python's own standard-library source (``char_corpus``: every machine with Python has it, no
download), one token per byte. Every rank draws the same global batches (``batches`` with one seed) and
``sf.compile(..., strategy="hybrid")`` splits each batch over ``dp`` and the model's Megatron pairs over
``tp``. Rank 0 prints the plan, a progress bar with the loss and tokens/s, and the loss at the start and at
the end. Before training, rank 0 trains a copy of the same model with plain PyTorch for the first
``CHECK_STEPS`` steps on the same batches (the test oracle: parallel must equal serial); every rank compares
its parallel losses with those, and the demo exits 1 if any differs by more than ``RTOL``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import sys
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

import shardflow as sf
from shardflow.models import CHAR_VOCAB_SIZE, GPT, GPTConfig, batches, char_corpus

DEFAULT_STEPS = 40
CHECK_STEPS = 3  # steps compared with plain PyTorch
RTOL, ATOL = 1e-4, 1e-5  # CONTRACT.md's numerics policy, as in tests/graph/test_compile.py
BATCH = 8  # global batch (sequences per step), split over dp
CONFIG = GPTConfig(vocab_size=CHAR_VOCAB_SIZE, block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
LR, EPS, MAX_GRAD_NORM = 3e-3, 1e-6, 1.0
MODEL_SEED, DATA_SEED = 0, 1
TP = 2  # the tp axis; dp takes the other ranks (2 of 4)
TIMEOUT_S = 120  # per collective; far above a step of this model, so a slower one is a hang
PLAN_LINES = 24  # explain() lines shown (after collapsing repeated layers) before the rest is cut
RATE_WINDOW = 5  # tokens/s on the progress bar: over the last this many steps


def _optimizer(params: object) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, eps=EPS, foreach=False)  # type: ignore[arg-type]


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shardflow demo", add_help=False)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    args = parser.parse_args(list(argv))
    if args.steps < CHECK_STEPS:
        parser.error(f"--steps must be at least {CHECK_STEPS} (the steps checked against serial PyTorch)")
    return args


def serial_losses(model: torch.nn.Module, data: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
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
    kept, hidden = [], 0
    for ln in lines:
        if ".h." in ln and ".h.0." not in ln:
            layer = ln.split(".h.", 1)[1].split(".", 1)[0]
            if ln.replace(f".h.{layer}.", ".h.0.") in first:
                hidden += 1
                continue
        kept.append(ln)
    if len(kept) > PLAN_LINES:
        hidden += len(kept) - PLAN_LINES
        kept = kept[:PLAN_LINES]
    if hidden:
        kept.append(f"  ... and {hidden} more: transformer.h.1, ... are laid out like transformer.h.0")
    return "\n".join(kept)


def compare(got: Sequence[float], want: Sequence[float]) -> list[int]:
    """The 1-based steps whose parallel loss ``got`` is not within ``RTOL``/``ATOL`` of the serial ``want``."""
    if len(got) != len(want):
        raise ValueError(f"{len(got)} parallel losses but {len(want)} serial ones")
    return [i for i, (g, w) in enumerate(zip(got, want), 1) if not abs(g - w) <= ATOL + RTOL * abs(w)]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def main() -> int:
    """The worker of ``shardflow demo``: run on every rank (``shardflow.cli.launch``); 1 if a check failed."""
    args = _parse(sys.argv[1:])
    sf.init(timeout=TIMEOUT_S)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size < 2 * TP:
        raise ValueError(f"the GPT demo needs at least {2 * TP} ranks for its dp × tp mesh, got {world_size}")
    dp = world_size // TP
    mesh = sf.Mesh("cpu", (dp, TP), names=("dp", "tp"), ranks=range(dp * TP))

    torch.manual_seed(MODEL_SEED)  # every rank builds the same model
    model = GPT(CONFIG)
    tokens = char_corpus()
    stream = batches(tokens, BATCH, CONFIG.block_size, seed=DATA_SEED)  # the same batches on every rank
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
        strategy="hybrid",
        optimizer=_optimizer,
        max_grad_norm=MAX_GRAD_NORM,
    )
    tokens_per_step = BATCH * CONFIG.block_size
    console = None
    if rank == 0:
        from rich.console import Console

        console = Console(highlight=False)
        if not console.is_terminal:
            console.width = max(console.width, 120)
        console.print(
            f"[bold]GPT on Python's standard library source[/] ({tokens.numel() / 1e6:.1f} M bytes, "
            f"vocab {CONFIG.vocab_size}): {CONFIG.n_layer} layers, {CONFIG.n_head} heads, width {CONFIG.n_embd}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e3:.0f} k parameters"
        )
        console.print(
            f"{world_size} CPU ranks (gloo) as dp × tp = {dp} × {TP}; global batch {BATCH} × {CONFIG.block_size} "
            f"tokens, AdamW lr {LR}, clip {MAX_GRAD_NORM}, {args.steps} steps"
        )
        console.print("\nThe plan (pm.explain()):")
        console.print(_plan_summary(pm.explain()), markup=False)
        console.print()

    losses: list[float] = []
    start = time.perf_counter()
    if console is not None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  {task.fields[tps]:,.0f} tokens/s"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("train", total=args.steps, loss=math.nan, tps=0.0)
            every = max(1, args.steps // 5)
            for step, (x, y) in enumerate(data, 1):
                losses.append(pm.step(x, y))
                tps = step * tokens_per_step / (time.perf_counter() - start)
                progress.update(task, advance=1, loss=losses[-1], tps=tps)
                if step % every == 0 or step == CHECK_STEPS:
                    progress.console.print(f"step {step:>4}  loss {losses[-1]:.4f}  {tps:,.0f} tokens/s")
    else:
        losses = [pm.step(x, y) for x, y in data]
    seconds = time.perf_counter() - start

    got = torch.tensor(losses[:CHECK_STEPS], dtype=torch.float64)
    ok = torch.tensor(int(bool(torch.allclose(got, want, rtol=RTOL, atol=ATOL))), dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank agrees on the verdict and the exit code
    if console is not None:
        k = max(1, min(5, args.steps // 4))
        console.print(
            f"\nloss {_mean(losses[:k]):.3f} → {_mean(losses[-k:]):.3f} (mean of the first {k} and last {k} steps); "
            f"{args.steps} steps in {seconds:.1f} s, {args.steps * tokens_per_step / seconds:,.0f} tokens/s"
        )
        if bool(ok):
            console.print(f"first {CHECK_STEPS} steps match serial PyTorch [green]✓[/] (rtol {RTOL:g})")
        else:
            console.print(f"[red]✗ first {CHECK_STEPS} steps DIFFER from serial PyTorch[/] (rtol {RTOL:g}):")
            for i, (g, w) in enumerate(zip(got.tolist(), want.tolist()), 1):
                console.print(f"  step {i}: shardflow {g:.6f}, serial PyTorch {w:.6f}")
    dist.destroy_process_group()
    return 0 if bool(ok) else 1
