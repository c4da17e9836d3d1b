"""One GPU: a compiled GPT step with its temporaries left to the caching allocator, placed where it does not
raise the peak (``arena=True``) or all placed (``arena="all"``), against the same model in plain eager
PyTorch; and each plan's predicted peak against ``torch.cuda.max_memory_allocated``.

Single rank (NCCL cannot run two ranks on one GPU): the plan is data parallel over one device, so this
measures the lowered program, the static placement and the input staging, not communication. fp32, AdamW.
Memory: each plan alone on the device, two steps, then the third measured from reset peak statistics (with
``cuda_graphs=True`` the third step is the capture: what it allocates is the graph's pool, which its replays
reuse without allocating).
Time: the sides in rotating order, each call one step between ``synchronize()``s, medians of
``--repeats`` after ``--warmup``. The first losses must agree (rtol 1e-4).

    python benchmarks/gpu_arena.py [--repeats 30] [--markdown]      (``--device cpu`` runs it anywhere)

``--gpt2 --dtype bfloat16 --modes off,graph --compile`` is the reference case instead: GPT-2 small at batch
16 x 1024 in bf16 (weights and AdamW state in bf16 on both sides), with ``torch.compile`` of the eager model
as another side; memory is not measured then. ``graph`` is ``sf.compile(..., cuda_graphs=True)``: the step
replayed as one CUDA graph (runtime/cuda_graph.py); ``inductor`` is ``inductor=True``, the program compiled by
``torch.compile`` (runtime/inductor.py); ``both`` is the two together.

Every side's FLOP/s and MFU come from one count, shardflow's (``pm.flops().total``: the model's step, the
same work for every side), over the device's peak (``runtime/meter.py``: a GPU's datasheet figure for the
dtype; on a CPU a matmul probe).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_preamble, print_table, spread


def _model(cfg: Any, dtype: torch.dtype = torch.float32) -> Any:
    from shardflow.models.gpt import GPT

    torch.manual_seed(0)
    return GPT(cfg).to(dtype)


def _config(args: Any) -> Any:
    from shardflow.models.gpt import GPTConfig

    if args.gpt2:
        return GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=args.width or 768)
    return GPTConfig(vocab_size=1024, block_size=256, n_layer=args.layers, n_head=8, n_embd=args.width or 512)


def _count(args: Any) -> None:
    from shardflow.graph.flops import model_flops
    from shardflow.models.gpt import GPT

    cfg = _config(args)
    with torch.device("meta"):
        model = GPT(cfg)
    x = torch.zeros(args.batch, cfg.block_size, dtype=torch.long)
    print(f"GPT {cfg.n_layer}x{cfg.n_embd}, batch {args.batch}x{cfg.block_size}")
    print(model_flops(model, (x, x)).explain())


def main() -> None:
    import shardflow as sf
    from shardflow.runtime.meter import device_peak

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=0, help="n_embd (default 512; --gpt2: 768)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--gpt2", action="store_true", help="GPT-2 small (12 x 768, vocab 50257) at 1024 tokens")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--modes",
        default=None,
        help="compiled sides: off, true, all (arena), graph (default: all four; no graph on CPU)",
    )
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the eager model")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--count-only", action="store_true", help="print the step's FLOPs (shardflow's count) and stop")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    names = args.modes or ("off,true,all,graph" if args.device == "cuda" else "off,true,all")
    known = {"off": False, "true": True, "all": "all", "graph": "graph", "inductor": "inductor", "both": "both"}
    modes = [known[m] for m in names.split(",")]
    print_preamble()
    cuda = args.device == "cuda"
    if args.count_only:  # on a meta-device model: no weights, no device
        _count(args)
        return
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu")
    if cuda:
        print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    cfg = _config(args)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), generator=gen)
    mesh = sf.Mesh(args.device, (1,))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # memory: each plan alone on the device
    memory: dict[Any, tuple[int, int | None, int]] = {}

    def compiled(mode: Any, dtype: torch.dtype = torch.float32) -> Any:
        arena = mode if mode in (False, True, "all") else False
        graphs, inductor = mode in ("graph", "both"), mode in ("inductor", "both")
        model = _model(cfg, dtype)
        return sf.compile(model, mesh, example_inputs=(x, y), arena=arena, cuda_graphs=graphs, inductor=inductor)

    for mode in modes if dtype == torch.float32 else []:
        pm = compiled(mode)
        pm.step(x, y)
        pm.step(x, y)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        pm.step(x, y)
        sync()
        measured = torch.cuda.max_memory_allocated() if cuda else None
        arena = next(iter(pm.programs.values())).arena
        memory[mode] = (pm.memory().peak, measured, len(arena.views) if arena is not None else 0)
        del pm, arena
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    # time: all sides at once, rotating
    pms = {mode: compiled(mode, dtype) for mode in modes}

    def eager_step(compiled: bool) -> Any:
        ref = _model(cfg, dtype).to(args.device)
        opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
        forward = torch.compile(ref) if compiled else ref

        def step() -> float:
            loss = forward(x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

        return step

    steps: dict[Any, Any] = {mode: (lambda pm=pm: pm.step(x, y)) for mode, pm in pms.items()}
    steps["eager"] = eager_step(False)
    if args.compile:
        steps["compile"] = eager_step(True)
    first = {k: f() for k, f in steps.items()}
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: kernels round differently
    if any(abs(loss - first["eager"]) > tolerance * abs(first["eager"]) for loss in first.values()):
        raise AssertionError(f"first losses differ: {first}")
    for _ in range(args.warmup):
        for f in steps.values():
            f()
    order = list(steps)
    times: dict[Any, list[float]] = {k: [] for k in order}
    for i in range(args.repeats):
        for k in order[i % len(order) :] + order[: i % len(order)]:
            sync()
            t = time.perf_counter()
            steps[k]()
            sync()
            times[k].append(time.perf_counter() - t)
    eager_ms = statistics.median(times["eager"]) * 1e3
    counted = next(iter(pms.values())).flops().total
    peak = device_peak(args.device, dtype)
    print(
        f"FLOPs per step (shardflow's count): {counted / 1e9:.2f} GFLOP; peak {peak.flops_per_s / 1e12:.4g} TFLOP/s ({peak.source})"
    )
    rows = []
    for k in order:
        ms = statistics.median(times[k]) * 1e3
        name = {False: "sf.compile, allocator", True: "sf.compile, arena=True", "all": "sf.compile, arena='all'"}
        name["graph"] = "sf.compile, cuda_graphs=True"
        name |= {"inductor": "sf.compile, inductor=True", "both": "sf.compile, inductor + cuda_graphs"}
        name |= {"eager": "eager PyTorch", "compile": "torch.compile"}
        predicted, measured, blocks = memory.get(k, (None, None, 0))
        rows.append(
            [
                name[k],
                f"{ms:.2f} (±{spread(times[k]):.0%})",
                f"{eager_ms / ms:.2f}",
                f"{counted / ms / 1e9:.3g}",
                f"{counted / (ms / 1e3) / peak.flops_per_s:.1%}",
                str(blocks) if k in memory else "",
                f"{predicted / 2**20:.1f}" if predicted else "",
                f"{measured / 2**20:.1f}" if measured else "",
                f"{measured / predicted:.3f}" if measured and predicted else "",
            ]
        )
    shape = f"GPT {cfg.n_layer}x{cfg.n_embd}, batch {args.batch}x{cfg.block_size}, {args.dtype}"
    header = [
        shape,
        "step ms",
        "eager / this",
        "TFLOP/s",
        "MFU",
        "placed",
        "predicted MiB",
        "max allocated MiB",
        "measured / predicted",
    ]
    print_table(header, rows, args.markdown)


if __name__ == "__main__":
    main()
