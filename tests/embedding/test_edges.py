"""Edge cases of sparse lookups, each equal to plain PyTorch: tables called in another order than they were
registered, one table read between two others (a, b, a) with equal widths (a mix-up would not fail on
shapes), int32 ids and offsets, empty bags, a batch smaller than the ranks (some rank has no sample), and a
column split wider than some tables (a rank holds no column of them); a step given another batch than the
previous step's ``next_inputs`` is a clear error."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import shardflow as sf
from shardflow.testing import run_on_ranks


class Crossed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.item = nn.EmbeddingBag(30, 3, mode="sum")  # registered first, called second and fourth
        self.user = nn.EmbeddingBag(20, 3, mode="sum")
        self.wide = nn.EmbeddingBag(12, 5, mode="mean")
        self.head = nn.Linear(4 * 3 + 5, 1)

    def forward(self, iu, ou, ii, oi, iw, ow, y):  # type: ignore[no-untyped-def]
        parts = [
            self.user(iu, ou),
            self.item(ii, oi),
            self.wide(iw, ow),
            self.item(iu % 30, ou),
            self.user(ii % 20, oi),
        ]
        return (self.head(torch.cat(parts, 1)).squeeze(1) - y).pow(2).mean()


def batch(seed: int, size: int, dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)

    def bags(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = torch.randint(0, 3, (size,), generator=g)  # empty bags among them
        ids = torch.randint(0, rows, (int(sizes.sum()),), generator=g)
        return ids.to(dtype), torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]]).to(dtype)

    return (*bags(20), *bags(30), *bags(12), torch.randn(size, generator=g))


def _train(placement: Any, size: int, dtype: torch.dtype) -> tuple[list[float], dict[str, torch.Tensor]]:
    sf.init()
    torch.manual_seed(0)
    mesh = sf.Mesh("cpu", (torch.distributed.get_world_size(),))
    spec = sf.Embeddings(placement=placement, optimizer=sf.embedding.Adagrad(0.1))
    pm = sf.compile(Crossed(), mesh, example_inputs=batch(0, size, dtype),
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), embeddings=spec)  # fmt: skip
    losses = [pm.step(*batch(s, size, dtype)) for s in range(4)]
    return losses, pm.full_state_dict()


def _reference(size: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Crossed()
    for m in (model.item, model.user, model.wide):
        m.sparse = True
    tables = [model.item.weight, model.user.weight, model.wide.weight]
    opts = [torch.optim.SGD(model.head.parameters(), lr=0.1), torch.optim.Adagrad(tables, lr=0.1, eps=1e-10)]
    losses = []
    for s in range(4):
        for o in opts:
            o.zero_grad()
        loss = model(*batch(s, size))
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


def _check(n: int, placement: Any, size: int, dtype: torch.dtype = torch.int64) -> None:
    losses, state = run_on_ranks(n, _train, placement, size, dtype, timeout=300)[0]
    ref_losses, ref_state = _reference(size)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-5)
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_call_order_int32_and_empty_bags() -> None:
    _check(2, {"item": "row", "user": "table", "wide": "column"}, 10, torch.int32)


def test_fewer_samples_than_ranks_and_columns_than_ranks() -> None:
    """3 samples on 4 ranks (one rank has none); ``user`` (3 columns) split by columns over 4 ranks."""
    _check(4, {"user": "column", "item": "row", "wide": "replicated"}, 3)


def _wrong_next() -> str:
    sf.init()
    torch.manual_seed(0)
    pm = sf.compile(Crossed(), sf.Mesh("cpu", (2,)), example_inputs=batch(0, 6), embeddings=sf.Embeddings())
    pm.step(*batch(0, 6), next_inputs=batch(1, 6))
    pm.step(*batch(1, 6), next_inputs=batch(2, 6))  # an equal batch made again is the same batch
    try:
        pm.step(*batch(3, 6))
    except ValueError as e:
        return str(e)
    return "no error"


def test_a_step_must_take_the_batch_it_was_told_is_next() -> None:
    message = run_on_ranks(2, _wrong_next, timeout=300)[0]
    assert "another batch than the next_inputs" in message, message


def _misspelt() -> str:
    sf.init()
    try:
        sf.compile(Crossed(), sf.Mesh("cpu", (1,)), example_inputs=batch(0, 4),
                   embeddings=sf.Embeddings(placement={"users": "row"}))  # fmt: skip
    except ValueError as e:
        return str(e)
    return "no error"


def test_a_glob_matching_no_table_is_an_error() -> None:
    message = run_on_ranks(1, _misspelt, timeout=120)[0]
    assert "['users'] match none of the tables" in message, message
