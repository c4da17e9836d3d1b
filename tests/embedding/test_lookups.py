"""Lookups beyond DLRM's, each equal to plain PyTorch on 2 ranks: an ``nn.Embedding`` with ``padding_idx``,
per-sample weights with ``include_last_offset``, ``mode="max"`` and ``"mean"``, ids transformed by the
forward (``ids % rows``), one table looked up twice, a table built on the meta device (initialised by
``init_rows`` on both sides); ``predict`` through ``pm.evaluate``; the plan's tables through JSON."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import shardflow as sf
from shardflow.testing import run_on_ranks

B = 10


class Toy(nn.Module):
    def __init__(self, meta: bool = False) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(40, 6, mode="sum", include_last_offset=True)
        self.mx = nn.EmbeddingBag(9, 6, mode="max")
        self.mean = nn.EmbeddingBag(30, 6, mode="mean", padding_idx=0)
        self.emb = nn.Embedding(25, 6, padding_idx=3)
        self.big = nn.EmbeddingBag(500, 6, mode="sum", device="meta" if meta else None)
        self.head = nn.Linear(6 * 6, 1)

    def forward(self, x, ia, oa, wa, ib, ob, ic, oc, seq, hashed, y):  # type: ignore[no-untyped-def]
        return self.score(x, ia, oa, wa, ib, ob, ic, oc, seq, hashed).sub(y).pow(2).mean()

    def score(self, x, ia, oa, wa, ib, ob, ic, oc, seq, hashed):  # type: ignore[no-untyped-def]
        parts = [
            self.bag(ia, oa, per_sample_weights=wa),
            self.mx(ib, ob),
            self.mean(ic, oc),
            self.emb(seq).sum(1) + self.emb(seq % 7)[:, 0],  # one table, two lookups
            self.big(hashed % 500),  # 2-D bags, ids hashed in the forward
            x,
        ]
        return self.head(torch.cat(parts, 1)).squeeze(1)


def batch(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)

    def bags(rows: int, most: int) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = torch.randint(0, most + 1, (B,), generator=g)
        ids = torch.randint(0, rows, (int(sizes.sum()),), generator=g)
        return ids, torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])

    ia, oa = bags(40, 4)  # include_last_offset: B + 1 offsets
    wa = torch.rand(ia.shape, generator=g)
    ib, ob = bags(9, 3)
    ob = ob[:-1]
    ic, oc = bags(30, 3)
    oc = oc[:-1]
    seq = torch.randint(0, 25, (B, 3), generator=g)
    hashed = torch.randint(0, 10**6, (B, 2), generator=g)
    return torch.randn(B, 6, generator=g), ia, oa, wa, ib, ob, ic, oc, seq, hashed, torch.randn(B, generator=g)


def _plain(meta: bool) -> Toy:
    torch.manual_seed(0)
    model = Toy(meta)
    if meta:  # the reference holds the rows init_rows draws for the meta table
        ref = copy.deepcopy(model).to_empty(device="cpu")
        state = {k: v for k, v in model.state_dict().items() if not v.is_meta}
        ref.load_state_dict(state, strict=False)
        ref.big.weight.data = sf.embedding.init_rows("big", torch.arange(500), 6, seed=4)
        return ref
    return model


def _train(meta: bool, steps: int) -> Any:
    sf.init()
    torch.manual_seed(0)
    model = Toy(meta)
    mesh = sf.Mesh("cpu", (torch.distributed.get_world_size(),))
    spec = sf.Embeddings(
        tables=["bag", "mx", "mean", "emb", "big"],
        placement={"bag": "column", "mx": "table", "emb": "row"},
        optimizer=sf.embedding.SGD(0.05),
        seed=4,
    )
    pm = sf.compile(model, mesh, example_inputs=batch(0), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05),
                    embeddings=spec)  # fmt: skip
    losses = [pm.step(*batch(s)) for s in range(steps)]
    predicted = pm.evaluate(*batch(99)[:-1], method="score")
    plan = sf.plan(model, mesh, example_inputs=batch(0), embeddings=spec)
    return losses, pm.full_state_dict(), predicted, plan.to_json(), pm.plan.to_json()


def _reference(meta: bool, steps: int) -> tuple[list[float], dict[str, torch.Tensor], torch.Tensor]:
    model = _plain(meta)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # SGD on dense gradients equals it on sparse ones
    losses = []
    for s in range(steps):
        opt.zero_grad()
        loss = model(*batch(s))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        predicted = model.score(*batch(99)[:-1])
    return losses, {k: v.detach() for k, v in model.state_dict().items()}, predicted


def _check(meta: bool) -> None:
    losses, state, predicted, fresh_json, used_json = run_on_ranks(2, _train, meta, 4, timeout=300)[0]
    ref_losses, ref_state, ref_predicted = _reference(meta, 4)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-5)
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(predicted, ref_predicted, rtol=1e-4, atol=1e-5)
    plan = sf.ParallelPlan.from_json(used_json)
    assert fresh_json == used_json and sf.ParallelPlan.from_json(plan.to_json()) == plan
    assert {n: t.placement for n, t in plan.tables.items()} == {
        "bag": "column", "mx": "table", "mean": plan.tables["mean"].placement, "emb": "row",
        "big": plan.tables["big"].placement,
    }  # fmt: skip
    assert "big" in plan.tables and "big.weight" not in plan.params and "head.weight" in plan.params


def test_lookups_equal_serial() -> None:
    _check(meta=False)


def test_meta_table_initialised_by_init_rows() -> None:
    _check(meta=True)


def test_init_rows_is_per_row_and_normal() -> None:
    rows = sf.embedding.init_rows("t", torch.arange(20000), 8, seed=1)
    assert abs(rows.mean().item()) < 0.02 and abs(rows.std().item() - 1) < 0.02
    some = sf.embedding.init_rows("t", torch.tensor([7, 19999]), 8, seed=1, cols=slice(2, 5))
    assert torch.equal(some, rows[[7, 19999], 2:5])
    assert not torch.equal(sf.embedding.init_rows("t", torch.arange(3), 8, seed=2), rows[:3])
    assert not torch.equal(sf.embedding.init_rows("u", torch.arange(3), 8, seed=1), rows[:3])
