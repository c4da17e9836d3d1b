"""``shardflow demo``: a tour of boxing that checks itself.

Every rank lays one uneven (7, 5) tensor out in a source layout, converts it to a target layout and checks
the result against plain PyTorch: the logical value (``full()``) must equal the original on every rank, and
a target without ``P`` must hold exactly the ``torch.tensor_split`` piece of its mesh coordinate. Sources
with ``P`` are genuine partial sums (every rank holds a different addend), not "value on one rank, zeros
elsewhere", so a reduction that drops or doubles an addend shows up. Rank 0 prints one row per conversion:
its route (the planner's step kinds), bytes sent per rank and whether every rank's check passed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

import shardflow as sf

SHAPE = (7, 5)  # uneven over 2, 3 and 4 ranks on both dims
LAYOUTS_1D = (sf.B, sf.P, sf.S(0), sf.S(1))
TIMEOUT_S = 30  # per collective; moving a 7×5 tensor never takes this long, so a slower one is a hang
EXPLAIN = ((sf.P, sf.S(1)), (sf.S(1), sf.B))  # the case whose plan is printed in full (on the 2-d mesh)


@dataclass(frozen=True)
class Case:
    label: str  # which mesh(es), for people
    src_mesh: sf.Mesh
    src: tuple
    dst_mesh: sf.Mesh
    dst: tuple


def _fmt(sbp: Sequence[object]) -> str:
    return repr(sbp[0]) if len(sbp) == 1 else "(" + ", ".join(map(repr, sbp)) + ")"


def _where(mesh: sf.Mesh) -> str:
    """``[0,1,2]`` for a 1-d mesh, ``dp×tp 2×2`` for an n-d one."""
    if mesh.ndim == 1:
        return "[" + ",".join(map(str, mesh.ranks)) + "]"
    return "×".join(mesh.names) + " " + "×".join(map(str, mesh.shape))


def cases(world_size: int) -> list[Case]:
    """The tour for ``world_size`` (>= 4) ranks; every rank builds the same list (SPMD)."""
    S, B, P = sf.S, sf.B, sf.P
    line = sf.Mesh("cpu", (world_size,), names=("r",))
    half = world_size // 2
    grid = sf.Mesh("cpu", (2, half), names=("dp", "tp"), ranks=range(2 * half))
    pair = sf.Mesh("cpu", (2,), names=("r",), ranks=[0, 1])
    tail = sf.Mesh("cpu", (world_size - 1,), names=("r",), ranks=range(1, world_size))
    head = sf.Mesh("cpu", (world_size - 1,), names=("r",), ranks=range(world_size - 1))

    out = [Case(_where(line), line, (a,), line, (b,)) for a in LAYOUTS_1D for b in LAYOUTS_1D]
    grid_pairs = [
        ((S(0), S(0)), (B, B)),  # nested split of one dim: inner axis first
        ((S(0), S(0)), (S(1), S(1))),
        ((S(0), S(1)), (S(1), S(0))),
        ((P, S(1)), (S(1), B)),
        ((P, P), (B, B)),
        ((P, P), (S(0), S(1))),
        ((S(1), P), (S(0), S(0))),
        ((B, B), (S(0), S(0))),
        ((S(0), B), (B, S(1))),
        ((S(0), S(1)), (P, P)),
    ]
    out += [Case(_where(grid), grid, a, grid, b) for a, b in grid_pairs]
    cross = [
        (pair, (S(0),), tail, (S(0),)),
        (pair, (S(0),), tail, (B,)),
        (pair, (P,), tail, (S(1),)),
        (pair, (B,), tail, (P,)),
        (line, (S(1),), head, (S(0),)),
        (line, (P,), head, (B,)),
        (grid, (S(0), S(1)), head, (S(1),)),
        (grid, (P, S(0)), head, (S(0),)),
    ]
    out += [Case(f"{_where(a)} → {_where(b)}", a, sa, b, sb) for a, sa, b, sb in cross]
    return out


def _source(value: torch.Tensor, mesh: sf.Mesh, sbp: tuple, rank: int) -> sf.GlobalTensor:
    """``value`` in layout ``sbp``; on ``P`` axes every coordinate holds a different addend."""
    x = sf.distribute(value, mesh, sbp)
    if not any(p == sf.P for p in sbp):
        return x
    shift = 0.0
    if rank in mesh:
        # Each P axis adds (coord - mean coord) * weight: zero-sum over the axis, exact in float32.
        coord = mesh.coord_of(rank)
        shift = sum((coord[a] - (mesh.shape[a] - 1) / 2) * (a + 1) for a, p in enumerate(sbp) if p == sf.P)
    return sf.from_local(x.to_local() + shift, mesh, sbp, shape=value.shape)


def _oracle_local(value: torch.Tensor, mesh: sf.Mesh, sbp: tuple, coord: Sequence[int]) -> torch.Tensor:
    """Plain PyTorch: the piece a coordinate holds, splitting axis by axis with ``tensor_split``."""
    piece = value
    for axis, p in enumerate(sbp):
        if isinstance(p, sf.S):
            piece = torch.tensor_split(piece, mesh.shape[axis], dim=p.dim)[coord[axis]]
    return piece


def check(case: Case, value: torch.Tensor, rank: int) -> bool:
    """Convert ``value`` from the case's source layout to its target; True if this rank sees no error."""
    x = _source(value, case.src_mesh, case.src, rank)
    y = x.redistribute(case.dst, mesh=case.dst_mesh)
    full = y.full()
    if tuple(y.shape) != tuple(value.shape) or tuple(y.sbp) != tuple(case.dst):
        return False
    if rank not in case.dst_mesh:
        return full.numel() == 0 and y.to_local().numel() == 0
    if not torch.equal(full, value):
        return False
    if any(p == sf.P for p in case.dst):
        return True  # a partial local has no oracle of its own; full() above summed it
    return torch.equal(y.to_local(), _oracle_local(value, case.dst_mesh, case.dst, case.dst_mesh.coord_of(rank)))


def _fmt_bytes(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"


def _report(tour: list[Case], ok: torch.Tensor, seconds: float) -> None:
    """Rank 0's table; ``ok[r, i]`` is rank r's verdict on case i."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # pipes and logs: keep each row on one line
    world_size = ok.shape[0]
    table = Table(title=f"boxing tour: a {SHAPE[0]}×{SHAPE[1]} float32 tensor on {world_size} CPU ranks (gloo)")
    for name, justify in [("#", "right"), ("mesh", "left"), ("source → target", "left"), ("route", "left")]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("bytes/rank", justify="right")
    table.add_column("check", justify="center")
    failed = []
    for i, case in enumerate(tour):
        plan = sf.plan_boxing(SHAPE, torch.float32, case.src_mesh, case.src, case.dst_mesh, case.dst)
        bad = [r for r in range(world_size) if not ok[r, i]]
        verdict = "[green]✓[/]" if not bad else f"[red]✗ rank {','.join(map(str, bad))}[/]"
        if bad:
            failed.append(i + 1)
        arrow = f"{_fmt(case.src)} → {_fmt(case.dst)}"
        table.add_row(str(i + 1), case.label, arrow, plan.route, _fmt_bytes(plan.bytes_per_rank), verdict)
    console.print(table)
    if failed:
        console.print(
            f"[red]{len(failed)} of {len(tour)} conversions FAILED[/] (rows {', '.join(map(str, failed))}): "
            "the logical tensor changed"
        )
    else:
        console.print(f"{len(tour)} conversions, all logical tensors survived ({seconds:.2f} s)")
    for case in tour:
        if (case.src, case.dst) == EXPLAIN:
            plan = sf.plan_boxing(SHAPE, torch.float32, case.src_mesh, case.src, case.dst_mesh, case.dst)
            console.print("\nOne plan in full (sf.plan_boxing(...).explain()):", highlight=False)
            console.print(plan.explain(), highlight=False, markup=False)


def main() -> int:
    """The worker of ``shardflow demo``: run on every rank (``shardflow.cli.launch``); 1 if a check failed."""
    sf.init(timeout=TIMEOUT_S)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size < 4:
        raise ValueError(f"the boxing tour needs at least 4 ranks for its 2×2 mesh, got {world_size}")
    start = time.perf_counter()
    value = torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.float32).reshape(SHAPE)  # distinct entries
    tour = cases(world_size)
    # Row r holds rank r's verdicts; one all-reduce tells every rank every verdict, so all agree on the
    # exit code and rank 0 can name the ranks that saw a wrong value.
    verdicts = torch.zeros((world_size, len(tour)), dtype=torch.int32)
    verdicts[rank] = torch.tensor([check(case, value, rank) for case in tour], dtype=torch.int32)
    dist.all_reduce(verdicts)
    if rank == 0:
        _report(tour, verdicts, time.perf_counter() - start)
    dist.destroy_process_group()
    return 0 if bool(verdicts.all()) else 1
