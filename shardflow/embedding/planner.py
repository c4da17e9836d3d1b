"""Placing tables: each table's placement by its size and the all-to-all time the boxing cost model prices,
overridable per glob (``sf.Embeddings(placement=...)``); and what a placement costs, for ``explain``.

Decision: greedy, largest table first, as TorchRec's default proposer and OneFlow's sharding planner do. A
candidate must keep every rank's table bytes within 1.25x of an even share (so ``replicated`` is for small
tables and ``table`` needs room on its rank); among those, the one whose busiest rank then spends the least
time sending and receiving ids, rows and gradients (unique ids per rank from the example batch; the link of
``boxing.DEFAULT_COST``) wins, ties (within 1%) to ``table``, then ``row``, ``column``, ``replicated``. With one
exchange for all tables a row split never moves more bytes than a whole table, so large tables go by rows;
a table with fewer rows than ranks is not split (its shards would be empty), nor one narrower than the
ranks by columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shardflow.boxing import DEFAULT_COST
from shardflow.embedding.lookups import TableModule
from shardflow.embedding.optimizers import floats_per_row
from shardflow.embedding.spec import Embeddings, Optimizer
from shardflow.plan.record import TablePlan

_ORDER = ("table", "row", "column", "replicated")
_SLACK = 1.25  # a rank may hold this much more than an even share of the tables


@dataclass(frozen=True)
class TableCost:
    """What one table's placement costs per rank of the group: bytes held (rows and optimizer state), and
    all-to-all bytes sent and received per step (ids, rows, gradients)."""

    held: tuple[int, ...]
    sent: tuple[float, ...]
    received: tuple[float, ...]


def table_bytes(t: TableModule, opt: Optimizer) -> int:
    """Bytes of the whole table and its optimizer state (float32)."""
    return 4 * t.rows * floats_per_row(opt, t.dim)


def cost(t: TableModule, plan: TablePlan, n: int, unique: float, opt: Optimizer) -> TableCost:
    """The per-rank cost of ``plan`` over ``n`` ranks when each rank looks up ``unique`` distinct ids a step."""
    whole = table_bytes(t, opt)
    row = t.dim * 4.0  # a row (or its gradient) on the wire
    others = n - 1
    if plan.placement == "row":
        held = tuple(whole // n + (r < whole % n) for r in range(n))
        each = unique * others / n * (8 + 2 * row)
        return TableCost(held, (each,) * n, (each,) * n)
    if plan.placement == "table":
        owner = plan.owner or 0
        held = tuple(whole if r == owner else 0 for r in range(n))
        sent = tuple(others * unique * row if r == owner else unique * (8 + row) for r in range(n))
        received = tuple(others * unique * (8 + row) if r == owner else unique * row for r in range(n))
        return TableCost(held, sent, received)
    if plan.placement == "column":
        held = tuple(whole // n for _ in range(n))
        each = unique * others * (8 + 2 * row / n)
        return TableCost(held, (each,) * n, (each,) * n)
    each = unique * others * (8 + row)  # replicated: ids and gradients to every other rank
    return TableCost((whole,) * n, (each,) * n, (each,) * n)


def place_tables(
    tables: Sequence[TableModule], spec: Embeddings, n: int, unique: Mapping[str, float]
) -> dict[str, TablePlan]:
    """Every table's placement over ``n`` ranks: the spec's where a glob names one, the planner's elsewhere."""
    opt = spec.optimizer
    total = sum(table_bytes(t, opt) for t in tables)
    cap = _SLACK * total / n
    held = [0.0] * n
    busy = [0.0] * n  # seconds of all-to-all traffic per rank so far
    chosen: dict[str, TablePlan] = {}
    for t in sorted(tables, key=lambda t: (-table_bytes(t, opt), t.name)):
        asked = spec.placement_of(t.name)
        options = [asked] if asked is not None else list(_ORDER)
        if asked is None:  # a split with empty shards gains nothing over a whole table
            options = [o for o in options if not (o == "row" and t.rows < n) and not (o == "column" and t.dim < n)]
        best: tuple[float, int, TablePlan, TableCost] | None = None
        for k, where in enumerate(options):
            owner = min(range(n), key=lambda r: (held[r], r)) if where == "table" else None
            plan = TablePlan(where, t.rows, t.dim, owner)
            c = cost(t, plan, n, unique.get(t.name, 0.0), opt)
            fits = max(h + x for h, x in zip(held, c.held)) <= cap or asked is not None
            seconds = max(b + (s + r) / DEFAULT_COST.bandwidth for b, s, r in zip(busy, c.sent, c.received))
            if fits and (best is None or seconds < best[0] * 0.99):
                best = (seconds, k, plan, c)
        if best is None:  # nothing fits the slack (one table larger than the rest together): split it by rows
            plan = TablePlan("row", t.rows, t.dim)
            best = (0.0, 0, plan, cost(t, plan, n, unique.get(t.name, 0.0), opt))
        _, _, plan, c = best
        chosen[t.name] = plan
        held = [h + x for h, x in zip(held, c.held)]
        busy = [b + (s + r) / DEFAULT_COST.bandwidth for b, s, r in zip(busy, c.sent, c.received)]
    return {t.name: chosen[t.name] for t in tables}


def check_fits(plans: Mapping[str, TablePlan], tables: Sequence[TableModule], n: int) -> None:
    """A clear error for a placement that does not fit the group of ``n`` ranks."""
    shapes = {t.name: t for t in tables}
    for name, p in plans.items():
        t = shapes[name]
        if p.rows != t.rows or p.dim != t.dim:
            raise ValueError(f"the plan's table {name!r} is {p.rows} x {p.dim}; the model's is {t.rows} x {t.dim}")
        if p.placement == "table" and not 0 <= (p.owner or 0) < n:
            raise ValueError(
                f"table {name!r} is placed on data-parallel rank {p.owner}, but that axis has {n} ranks (0..{n - 1})"
            )
