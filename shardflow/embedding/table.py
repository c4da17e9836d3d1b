"""A table's local shard on one rank of its group: which rows and columns it holds, its optimizer state,
and where any row lives (``holders``).

Placements over the group's n ranks (the mesh's data-parallel axis): ``row`` splits rows like
``torch.tensor_split`` (layout ``S(0)``), ``column`` splits columns (``S(1)``), ``table`` keeps the table
whole on one rank (a one-rank sub-mesh), ``replicated`` keeps it whole on every rank (``B``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from shardflow.embedding.init import init_rows
from shardflow.embedding.lookups import TableModule
from shardflow.embedding.optimizers import new_state
from shardflow.embedding.spec import Optimizer
from shardflow.plan.record import TablePlan

_INIT_CHUNK = 2**20  # values drawn at once for a meta table (init_rows keeps ~40 bytes of temporaries each)


def bounds(total: int, n: int) -> list[int]:
    """``torch.tensor_split``'s boundaries of ``total`` items over ``n`` parts (the first ``total % n`` one larger)."""
    q, r = divmod(total, n)
    out = [0]
    for i in range(n):
        out.append(out[-1] + q + (1 if i < r else 0))
    return out


@dataclass
class Shard:
    """This rank's piece of one table: ``weight[rows_lo:rows_hi, cols_lo:cols_hi]`` of the logical table
    (an empty piece on ranks a table-wise table does not live on)."""

    module: TableModule
    plan: TablePlan
    n: int  # ranks in the table's group
    me: int  # this rank's index in it
    weight: torch.Tensor = field(init=False)
    state: dict[str, torch.Tensor] = field(init=False)
    row_bounds: list[int] = field(init=False)
    col_bounds: list[int] = field(init=False)
    steps: int = 0  # updates so far (SparseAdam's bias correction counts per table, as torch's per parameter)

    def __post_init__(self) -> None:
        m, p = self.module, self.plan
        self.row_bounds = bounds(m.rows, self.n) if p.placement == "row" else [0] * self.me + [0, m.rows]
        self.col_bounds = bounds(m.dim, self.n) if p.placement == "column" else [0] * self.me + [0, m.dim]
        if p.placement == "table" and self.me != p.owner:
            self.row_bounds = [0] * (self.me + 2)

    @property
    def rows(self) -> tuple[int, int]:
        return self.row_bounds[self.me], self.row_bounds[self.me + 1]

    @property
    def cols(self) -> tuple[int, int]:
        return self.col_bounds[self.me], self.col_bounds[self.me + 1]

    def fill(self, source: nn.Module | None, seed: int, opt: Optimizer) -> None:
        """This shard's values: sliced from the module's weight, or drawn by ``init_rows`` for a meta table."""
        (r0, r1), (c0, c1) = self.rows, self.cols
        if self.module.meta or source is None:
            self.weight = torch.empty(r1 - r0, c1 - c0)
            step = max(1, _INIT_CHUNK // max(1, c1 - c0))  # init_rows' temporaries: a chunk of rows at a time
            for a in range(r0, r1, step):
                b = min(a + step, r1)
                self.weight[a - r0 : b - r0] = init_rows(self.module.name, torch.arange(a, b), self.module.dim,
                                                         seed, slice(c0, c1))  # fmt: skip
            pad = self.module.padding_idx
            if pad is not None and r0 <= pad % self.module.rows < r1:  # zeroed, as torch initialises it
                self.weight[pad % self.module.rows - r0] = 0
        else:
            weight: torch.Tensor = source.weight  # type: ignore[assignment]
            self.weight = weight.detach()[r0:r1, c0:c1].to(torch.float32).clone()
        self.state = new_state(opt, self.weight, True)

    def holders(self, uniq: torch.Tensor) -> list[torch.Tensor]:
        """For sorted unique ids: the ids each rank of the group is sent (for its rows or its columns)."""
        place = self.plan.placement
        if place == "row":
            edges = torch.tensor(self.row_bounds[1:-1], dtype=uniq.dtype)
            counts = torch.bincount(torch.bucketize(uniq, edges, right=True), minlength=self.n)
            return list(torch.split(uniq, counts.tolist()))
        if place == "table":
            empty = uniq[:0]
            return [uniq if d == self.plan.owner else empty for d in range(self.n)]
        return [uniq] * self.n  # column: every rank holds some columns; replicated: every rank updates

    def width(self, d: int, backward: bool) -> int:
        """Floats per id exchanged with rank ``d``: the rows it returns, or the gradient it is sent."""
        place = self.plan.placement
        if place == "column":
            return self.col_bounds[d + 1] - self.col_bounds[d]
        if place == "replicated" and not backward:
            return 0  # looked up locally
        return self.module.dim

    def local_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Local row indices of ids this rank holds."""
        return ids - self.rows[0]
