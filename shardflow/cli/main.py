"""The ``shardflow`` command: one argparse parser, one subcommand per user entry point.

Kept light on purpose: torch is imported only by the subcommand that runs, so ``shardflow --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shardflow.cli import simulate  # its flags only; the simulation is imported when one runs

TRAIN_TARGET = "shardflow.demo.train_gpt:main"
BOXING_TARGET = "shardflow.demo.boxing_tour:main"
TRAIN_MAIN = "shardflow.train.loop:main"
PLAN_MAIN = "shardflow.train.loop:plan_main"
DEMO_MIN_RANKS = 4  # both demos use a 2×2 ('dp', 'tp') mesh
DEMO_STEPS = 30  # training steps of the GPT demo; keep in step with shardflow.demo.train_gpt.DEFAULT_STEPS
CHECK_STEPS = 3  # the training demo compares this many steps with serial PyTorch


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _demo(args: argparse.Namespace) -> int:
    from shardflow.cli.launch import launch

    if args.boxing:
        return launch(BOXING_TARGET, args.nprocs, [])
    extra = ["--pipeline", args.pipeline] if args.pipeline else []
    return launch(TRAIN_TARGET, args.nprocs, ["--steps", str(args.steps), *extra])


def _run(args: argparse.Namespace) -> int:
    from shardflow.cli.launch import launch

    return launch(
        args.script,
        args.nprocs,
        list(args.script_args),
        args.nnodes,
        args.rdzv_endpoint,
        args.local_addr,
        args.max_restarts,
    )


def _train(args: argparse.Namespace) -> int:
    from shardflow.cli.launch import launch
    from shardflow.train.config import job_ranks, load_config
    from shardflow.train.loop import check

    overrides = simulate.split_flags(args, args.overrides) if args.command == "plan" else args.overrides
    try:
        cfg = load_config(args.config, overrides)  # checked here, before any rank starts
        check(cfg)  # and what it names: modules, functions, classes, their arguments
    except (OSError, ValueError) as e:
        print(f"shardflow {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command == "plan" and args.simulate:
        return simulate.run(args, cfg)  # in this process: no ranks
    if args.command == "train" and cfg.save:
        print(
            "shardflow train: --save writes a plan from shardflow plan; to train with one, --plan FILE", file=sys.stderr
        )
        return 2
    try:
        ranks = job_ranks(cfg)  # the plan's mesh (--plan FILE), or the config's
    except ValueError as e:
        print(f"shardflow {args.command}: {e}", file=sys.stderr)
        return 2
    target = TRAIN_MAIN if args.command == "train" else PLAN_MAIN
    return launch(target, ranks, [args.config, *overrides], max_restarts=args.max_restarts)


def _trace(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shardflow.runtime import trace

    try:
        events = trace.read(args.trace)
    except ValueError as e:
        print(f"shardflow trace: {e}", file=sys.stderr)
        return 2
    png = args.output or str(Path(args.trace).with_suffix(".png"))
    trace.render(events, png, title=Path(args.trace).name)
    ranks = len({e.rank for e in events})
    print(f"{png}: {len(events)} events on {ranks} rank(s), compute idle {trace.idle_fraction(events):.1%}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shardflow.cli.calibrate import calibrate, table
    from shardflow.cost.profile import save
    from shardflow.testing import RankError

    try:
        profile = calibrate(args.ranks, quick=args.quick, device=args.device)
        # this machine's profile (device=None), a GPU's too: a shipped datasheet name keeps its figures
        where = save(profile, Path(args.out) if args.out else None)
    except (ValueError, OSError, RankError) as e:
        print(f"shardflow calibrate: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    print(table(profile))
    print(f"saved to {where}")
    return 0


def _add_max_restarts(parser: argparse.ArgumentParser, resumes: str) -> None:
    def count(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = -1
        if n < 0:
            raise argparse.ArgumentTypeError(f"expected a number of restarts >= 0, got {text!r}")
        return n

    parser.add_argument(
        "--max-restarts",
        type=count,
        default=0,
        metavar="N",
        help=f"restart every rank up to N times after a failure ({resumes}; default: 0, fail)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardflow",
        description="Distributed training on PyTorch: global tensors over device meshes, automatic boxing.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a small GPT on Python's own source on 4 local CPU ranks (dp × tp), checked against serial PyTorch",
        description=(
            "Start NPROCS local CPU ranks (gloo, torchrun's launcher) as a dp × tp mesh (tp = 2) and train a small "
            "character-level GPT on the standard library's Python source, which every Python has. Rank 0 prints "
            "the plan, a progress bar with the loss and tokens/s, and the loss at the start and at the end. The "
            f"first {CHECK_STEPS} steps are checked against the same model trained with plain PyTorch; the exit "
            "code is non-zero if they differ. With --boxing, tour the layout conversions instead: convert one "
            "uneven (7, 5) tensor between all pairs of B, P, S(0), S(1) on a 1-d mesh, nd-SBPs on a 2×2 mesh and "
            "between meshes of different ranks, printing each route and whether the tensor survived."
        ),
    )
    demo.add_argument(
        "-n",
        "--nprocs",
        type=_positive_int,
        default=DEMO_MIN_RANKS,
        metavar="NPROCS",
        help=f"number of local ranks (at least {DEMO_MIN_RANKS}, even for training; default: %(default)s)",
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"training steps (at least {CHECK_STEPS}; default: {DEMO_STEPS})",
    )
    demo.add_argument(
        "--boxing",
        action="store_true",
        help="run the boxing tour (every layout conversion, checked) instead of training",
    )
    demo.add_argument(
        "--pipeline",
        default=None,
        metavar="TRACE.json",
        help="train as 2 pipeline stages (1F1B) of data-parallel ranks; trace one step into TRACE.json and a PNG",
    )
    demo.set_defaults(func=_demo)
    run = sub.add_parser(
        "run",
        help="run a script on N local ranks (torchrun's launcher); --nnodes/--rdzv-endpoint for several hosts",
        description=(
            "Start NPROCS ranks of SCRIPT on this host through torchrun's machinery (c10d rendezvous, no "
            "restarts: a failing rank stops the job and is named). The script calls sf.init(). For several "
            "hosts, run the same command on each with --nnodes and one --rdzv-endpoint host:port."
        ),
    )
    run.add_argument("-n", "--nprocs", type=_positive_int, required=True, metavar="NPROCS", help="ranks on this host")
    run.add_argument("--nnodes", type=_positive_int, default=None, help="hosts in the job (default: SLURM's, else 1)")
    run.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="rendezvous of a multi-host job")
    run.add_argument(
        "--local-addr",
        default=None,
        metavar="ADDR",
        help="this host's address as the other hosts reach it (default: its name; set it on hosts with several networks)",
    )
    _add_max_restarts(run, "the script resumes itself")
    run.add_argument("script", help="a Python script, or package.module:function")
    run.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    run.set_defaults(func=_run)
    for name, text in (
        (
            "train",
            "train a model on its data from a TOML config (the built-in GPT or DLRM with sparse tables, a Hugging Face "
            "class or your own module and dataset): snapshots, --resume auto, evaluation, loss, throughput",
        ),
        ("plan", "compile a TOML config only: print the plan and every rank's predicted memory, run no step"),
    ):
        cmd = sub.add_parser(
            name,
            help=text,
            description=(
                f"{text[0].upper()}{text[1:]}. The job gets as many local ranks as the config's mesh has. Keys of the "
                "config can be set on the command line after it, e.g. --steps 100 --model.args.n_layer 4 --resume never "
                "(see examples/*.toml and shardflow/train/config.py for every key). shardflow plan CONFIG --save plan.json "
                "writes the plan as JSON; shardflow train CONFIG --plan plan.json trains with it (it wins over the "
                "config's mesh and strategy keys)."
            ),
        )
        _add_max_restarts(cmd, "training resumes from the newest snapshot")
        if name == "plan":
            simulate.add_flags(cmd)
        cmd.add_argument("config", help="a TOML file (examples/gpt.toml, examples/dlrm.toml)")
        cmd.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs overriding the config")
        cmd.set_defaults(func=_train)
    show = sub.add_parser(
        "trace",
        help="draw a step's trace (pm.step(..., trace='trace.json')) as a PNG timeline",
        description=(
            "Render a Chrome/Perfetto trace written by pm.step(..., trace=PATH) as a PNG: one row per rank and "
            "track, forwards blue and backwards orange with their micro-batch numbers. The JSON itself opens in "
            "ui.perfetto.dev or chrome://tracing."
        ),
    )
    show.add_argument("trace", help="the trace JSON file")
    show.add_argument("-o", "--output", default=None, help="the PNG to write (default: the trace's name, .png)")
    show.set_defaults(func=_trace)
    cal = sub.add_parser(
        "calibrate",
        help="measure this machine's device profile (compute, memory, collectives) for the cost model",
        description=(
            "Measure what one rank of a job of N local ranks computes per second (matmul, convolution, attention, "
            "element-wise; float32 and bfloat16), its memory bandwidth and per-op launch floor, and time shardflow's "
            "collectives on N ranks, fitted as latency + bytes / bus bandwidth. Prints the profile and saves it "
            "where the cost model looks for this machine's (a GPU's: under its name, e.g. h100), or to --out PATH."
        ),
    )
    cal.add_argument("-n", "--ranks", type=_positive_int, default=2, metavar="N", help="local ranks (default: 2)")
    cal.add_argument("--quick", action="store_true", help="fewer sizes and repeats (seconds, not a minute)")
    cal.add_argument("--out", default=None, metavar="PATH", help="write the profile's JSON here instead")
    cal.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="what to measure (default: cpu)")
    cal.set_defaults(func=_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shardflow`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.nprocs < DEMO_MIN_RANKS:
            parser.error(f"demo needs at least {DEMO_MIN_RANKS} ranks for its 2×2 mesh, got -n {args.nprocs}")
        if args.boxing and (args.steps is not None or args.pipeline):
            parser.error("--steps and --pipeline are for the training demo; the boxing tour (--boxing) has neither")
        if not args.boxing:
            if args.nprocs % 2:
                parser.error(f"the training demo needs an even number of ranks (dp × tp, tp = 2), got -n {args.nprocs}")
            if args.steps is None:
                args.steps = DEMO_STEPS
            if args.steps < CHECK_STEPS:
                parser.error(f"--steps must be at least {CHECK_STEPS}, the steps checked against serial PyTorch")
    if args.command == "run" and args.nnodes is None:  # inside SLURM: its hosts, else this one
        import os

        from shardflow.cli.slurm import from_env

        try:
            job = from_env(os.environ)
        except ValueError as e:
            parser.error(str(e))
        args.nnodes = job.nnodes if job else 1
        if job and not args.rdzv_endpoint:
            args.rdzv_endpoint = job.rdzv_endpoint
            print(f"shardflow: SLURM job on {job.nnodes} hosts; rendezvous at {job.rdzv_endpoint}", file=sys.stderr)
    if args.command == "run" and args.nnodes > 1 and not args.rdzv_endpoint:
        parser.error("--nnodes > 1 needs --rdzv-endpoint HOST:PORT, the same on every host")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
