"""The ``shardflow`` command: one argparse parser, one subcommand per user entry point.

Kept light on purpose: torch is imported only by the subcommand that runs, so ``shardflow --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEMO_TARGET = "shardflow.demo.boxing_tour:main"
DEMO_MIN_RANKS = 4  # the tour's 2×2 mesh


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

    return launch(DEMO_TARGET, args.nprocs, [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardflow",
        description="Distributed training on PyTorch: global tensors over device meshes, automatic boxing.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser(
        "demo",
        help="tour of boxing: convert a tensor between every layout on local CPU ranks and check it survives",
        description=(
            "Start NPROCS local CPU ranks (gloo, torchrun's launcher) and convert one uneven (7, 5) tensor "
            "between layouts: all 16 pairs of B, P, S(0), S(1) on a 1-d mesh, nd-SBPs on a 2×2 ('dp', 'tp') "
            "mesh, and between meshes of different ranks. Rank 0 prints each route, its bytes per rank and "
            "whether the logical tensor survived; the exit code is non-zero if any check failed."
        ),
    )
    demo.add_argument(
        "-n",
        "--nprocs",
        type=_positive_int,
        default=DEMO_MIN_RANKS,
        metavar="NPROCS",
        help=f"number of local ranks (at least {DEMO_MIN_RANKS}; default: %(default)s)",
    )
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shardflow`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.nprocs < DEMO_MIN_RANKS:
        parser.error(f"demo needs at least {DEMO_MIN_RANKS} ranks for its 2×2 mesh, got -n {args.nprocs}")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
