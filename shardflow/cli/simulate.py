"""The command-line face of ``shardflow plan CONFIG --simulate N1,N2,...`` (the work: ``train/simulate.py``).

Its flags may follow CONFIG among the config's ``--key value`` pairs, which the plan subcommand takes whole, so
they are parsed twice: by the subcommand (before CONFIG, and for ``--help``) and out of those pairs here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardflow.train.config import TrainConfig
    from shardflow.train.simulate import Row


def _device_counts(text: str) -> list[int]:
    counts = []
    for part in (p.strip() for p in text.split(",")):
        if not part.isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(f"expected device counts like 8,64,1024, got {text!r}")
        counts.append(int(part))
    return counts


def add_flags(parser: argparse.ArgumentParser) -> None:
    """``--simulate``, ``--device``, ``--plot``, ``--fixed-batch`` on ``parser``."""
    parser.add_argument(
        "--simulate",
        type=_device_counts,
        default=None,
        metavar="N1,N2,...",
        help="price the config's job at these device counts in this process, starting no rank: the axes but 'dp' "
        "keep their sizes, 'dp' takes the rest and the global batch grows with it; prints step time, memory, "
        "throughput and MFU per count and draws a scaling plot",
    )
    parser.add_argument(
        "--device",
        default=None,
        metavar="PROFILE",
        help="with --simulate: a device profile's name (h100, h200, a100) or JSON path (default: this machine's, "
        "measured by shardflow calibrate)",
    )
    parser.add_argument(
        "--plot", default=None, metavar="PNG", help="with --simulate: the scaling plot (default: RUN_DIR/simulate.png)"
    )
    parser.add_argument(
        "--fixed-batch",
        action="store_true",
        help="with --simulate: keep the config's global batch_size at every count (default: it grows with 'dp')",
    )


def split_flags(args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
    """Set ``args``' simulate flags from ``overrides``; the config's ``--key value`` pairs left."""
    flags = argparse.ArgumentParser(prog="shardflow plan", add_help=False, allow_abbrev=False)
    add_flags(flags)
    _, rest = flags.parse_known_args(list(overrides), namespace=args)  # flags given before CONFIG stay set
    if not args.simulate and (args.device or args.plot or args.fixed_batch):
        flags.error("--device, --plot and --fixed-batch go with --simulate N1,N2,...")
    return rest


def run(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """Print a row per device count as it is priced, then draw the plot; in this process, no ranks."""
    from shardflow.cost.profile import ProfileError
    from shardflow.train.simulate import Simulation, plot

    path = args.plot or os.path.join(cfg.run_dir or ".", "simulate.png")
    if os.path.isdir(path) or not os.access(_existing_parent(path), os.W_OK):  # said before minutes of pricing
        print(f"shardflow plan: cannot write the plot to {path!r}: give --plot a writable file path", file=sys.stderr)
        return 2
    rows: list[Row] = []
    try:
        sim = Simulation(cfg, args.simulate, args.device, args.fixed_batch)
        for row in sim.rows():
            if not rows:  # the header with the first row: a config refused on the way prints its error alone
                print(sim.header())
            print(sim.line(row), flush=True)
            rows.append(row)
    except ValueError as e:  # a ProfileError too: a machine never calibrated is told to run shardflow calibrate
        hint = "; here: --device h100 or --device PATH" if isinstance(e, ProfileError) and not args.device else ""
        print(f"shardflow plan: {e}{hint}", file=sys.stderr)
        return 2
    print(sim.footer(rows))
    try:
        plot(sim, rows, path)
    except OSError as e:
        print(f"shardflow plan: cannot write the plot to {path!r} ({e.strerror})", file=sys.stderr)
        return 2
    print(f"scaling plot: {path}")
    return 0


def _existing_parent(path: str) -> str:
    """The nearest folder of ``path`` that exists (the plot's folders are made as needed)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return folder
