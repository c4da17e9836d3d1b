"""The table planner: large tables split by rows, small ones whole on the least-loaded rank, overrides
obeyed, every rank's share of bytes kept near even; and its all-to-all estimate against the bytes a real
step sends."""

from __future__ import annotations

import torch

import shardflow as sf
from shardflow.embedding.lookups import TableModule
from shardflow.embedding.planner import place_tables, table_bytes
from shardflow.testing import run_on_ranks
from tests.embedding import cases


def _table(name: str, rows: int, dim: int = 16) -> TableModule:
    return TableModule(name, rows, dim, True, "sum", None, False, False)


def test_large_tables_by_rows_tiny_ones_whole_and_balanced() -> None:
    tables = [_table("huge", 100_000), _table("mid", 5000), *[_table(f"tiny{i}", 3) for i in range(8)]]
    spec = sf.Embeddings()
    plans = place_tables(tables, spec, 4, {t.name: min(200.0, t.rows) for t in tables})
    assert plans["huge"].placement == "row" and plans["mid"].placement == "row"  # by bytes, a split is cheaper
    owners = [plans[f"tiny{i}"].owner for i in range(8)]
    assert all(plans[f"tiny{i}"].placement == "table" for i in range(8))  # 3 rows over 4 ranks: not split
    assert sorted(owners.count(r) for r in range(4)) == [2, 2, 2, 2]  # least-loaded rank each time


def test_overrides_win_and_shares_stay_even() -> None:
    tables = [_table(f"t{i}", 5000 * (i + 1)) for i in range(6)]
    spec = sf.Embeddings(placement={"t5": "column", "t0": "replicated"})
    plans = place_tables(tables, spec, 2, {t.name: 100.0 for t in tables})
    assert plans["t5"].placement == "column" and plans["t0"].placement == "replicated"
    held = [0.0, 0.0]
    for t in tables:
        p = plans[t.name]
        whole = table_bytes(t, spec.optimizer)
        for r in range(2):
            share = whole if p.placement == "replicated" or p.owner == r else 0.0
            held[r] += whole / 2 if p.placement in ("row", "column") else share
    assert max(held) <= 1.25 * sum(table_bytes(t, spec.optimizer) for t in tables) / 2 + table_bytes(
        tables[0], spec.optimizer
    )


def _sent(placement: str | None) -> tuple[float, float]:
    sf.init()
    pm = cases.compiled(None if placement is None else {"*": placement}, "sgd", sf.Mesh("cpu", (2,)))
    pm.step(*cases.batch(0))  # the example batch: the estimate's unique ids are this batch's
    return float(pm.exchange.sent_bytes), pm.expected_bytes()


def test_estimated_all_to_all_bytes_near_the_bytes_sent() -> None:
    for placement in (None, "row", "column", "table", "replicated"):
        ranks = run_on_ranks(2, _sent, placement, timeout=300)
        sent = sum(r[0] for r in ranks) / len(ranks)  # the estimate is the mean over ranks
        expected = ranks[0][1]
        assert abs(sent - expected) <= 0.25 * sent, (placement, sent, expected)
        assert sent > 0


def test_placements_in_the_plan_survive_json() -> None:
    shape_model = cases.model()
    mesh = sf.MeshSpec("cpu", (4,), ("dp",), (0, 1, 2, 3))
    plan = sf.plan(shape_model, mesh, example_inputs=cases.batch(0), embeddings=sf.Embeddings())
    assert set(plan.tables) == {f"tables.{i}" for i in range(26)}
    assert sf.ParallelPlan.from_json(plan.to_json()) == plan
    assert not any(n.startswith("tables.") for n in plan.params)
    assert torch.Size([plan.tables["tables.0"].rows, plan.tables["tables.0"].dim]) == shape_model.tables[0].weight.shape
