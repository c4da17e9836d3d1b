"""Bad input to sparse tables is a clear error on every rank (never a hang, never a trace from deep inside
torch): ids out of range or negative (the table and the id named), offsets that do not fit the ids,
``max_norm``, a tied table, a placement the mesh cannot hold, ids feeding the dense part too, and the
later options (``tiers=``, ``servers=``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import shardflow as sf
from shardflow.plan import TablePlan
from shardflow.testing import run_on_ranks


class Two(nn.Module):
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.a = nn.EmbeddingBag(20, 4, mode="sum", **options)
        self.b = nn.EmbeddingBag(6, 4, mode="sum")
        self.head = nn.Linear(8, 1)

    def forward(self, ia, oa, ib, ob, y):  # type: ignore[no-untyped-def]
        return (self.head(torch.cat([self.a(ia, oa), self.b(ib, ob)], 1)).squeeze(1) - y).pow(2).mean()


def inputs(ia: list[int] | None = None, oa: list[int] | None = None) -> tuple[torch.Tensor, ...]:
    ia_t = torch.tensor(ia if ia is not None else [1, 2, 3, 4, 5, 6])
    oa_t = torch.tensor(oa if oa is not None else [0, 2, 3, 5])
    return ia_t, oa_t, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]), torch.zeros(4)


def _compile(model: nn.Module, spec: sf.Embeddings, example: tuple[torch.Tensor, ...] | None = None) -> Any:
    mesh = sf.Mesh("cpu", (torch.distributed.get_world_size(),))
    return sf.compile(model, mesh, example_inputs=example or inputs(), embeddings=spec)


def _step_error(bad: tuple[torch.Tensor, ...]) -> str:
    sf.init()
    pm = _compile(Two(), sf.Embeddings(placement={"a": "row", "b": "table"}))
    pm.step(*inputs())
    try:
        pm.step(*bad)
    except (ValueError, TypeError) as e:
        pm.step(*inputs())  # nothing half done: the next good batch steps on every rank
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.mark.parametrize(
    "bad, words",
    [
        (inputs(ia=[1, 2, 25, 4, 5, 6]), ["table 'a'", "id 25", "[0, 20)"]),
        (inputs(ia=[1, -3, 2, 4, 5, 6]), ["table 'a'", "id -3", "position 1"]),
        (inputs(oa=[1, 2, 3, 5]), ["table 'a'", "offsets must start at 0"]),
        (inputs(oa=[0, 3, 2, 5]), ["offsets must not decrease"]),
        (inputs(oa=[0, 2, 3, 9]), ["past the ids", "6 ids"]),
        (inputs(ia=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), ["ids must be an int64 (or int32) tensor"]),  # type: ignore[list-item]
    ],
)
def test_bad_batch_is_a_clear_error_on_every_rank(bad: tuple[torch.Tensor, ...], words: list[str]) -> None:
    for message in run_on_ranks(2, _step_error, bad, timeout=120):
        assert all(w in message for w in words), message


def _compile_error(options: dict[str, Any], spec: dict[str, Any], tie: bool = False) -> str:
    sf.init()
    model = Two(**options)
    if tie:
        model.c = nn.Linear(4, 20, bias=False)
        model.c.weight = model.a.weight
    try:
        _compile(model, sf.Embeddings(**spec))
    except (ValueError, TypeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.mark.parametrize(
    "options, spec, tie, words",
    [
        ({"max_norm": 1.0}, {}, False, ["table 'a'", "max_norm=1.0", "max_norm=None"]),
        ({}, {}, True, ["table 'a'", "tied to ['c.weight']"]),
        ({}, {"tables": "nothing.*"}, False, ["matches no nn.EmbeddingBag", "'a'", "'b'"]),
        ({"scale_grad_by_freq": True}, {}, False, ["scale_grad_by_freq"]),
    ],
)
def test_bad_model_is_a_clear_error(options: dict[str, Any], spec: dict[str, Any], tie: bool, words: list[str]) -> None:
    message = run_on_ranks(2, _compile_error, options, spec, tie, timeout=120)[0]
    assert all(w in message for w in words), message


def test_bad_spec_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="'diagonal'.*one of"):
        sf.Embeddings(placement={"*": "diagonal"})
    with pytest.raises(NotImplementedError, match="tiers=None"):
        sf.Embeddings(tiers=sf.embedding.Tiers(cache_rows=10))
    with pytest.raises(NotImplementedError, match="servers=None"):
        sf.Embeddings(servers="ps")
    with pytest.raises(TypeError, match="RowWiseAdagrad"):
        sf.Embeddings(optimizer=torch.optim.SGD)  # type: ignore[arg-type]
    with pytest.raises(sf.PlanError, match="names the index of its rank"):
        TablePlan("table", 10, 4)


def _placement_error() -> str:
    sf.init()
    model = Two()
    mesh = sf.Mesh("cpu", (2,))
    plan = sf.plan(model, mesh, example_inputs=inputs(), embeddings=sf.Embeddings())
    bad = plan.replace(tables={**plan.tables, "a": TablePlan("table", 20, 4, owner=3)})
    try:
        sf.compile(model, plan=bad, example_inputs=inputs(), embeddings=sf.Embeddings())
    except ValueError as e:
        return str(e)
    return "no error"


def test_placement_that_does_not_fit_the_mesh() -> None:
    message = run_on_ranks(2, _placement_error, timeout=120)[0]
    assert "table 'a' is placed on data-parallel rank 3" in message and "2 ranks" in message, message


class Leaky(Two):
    def forward(self, ia, oa, ib, ob, y):  # type: ignore[no-untyped-def]
        return super().forward(ia, oa, ib, ob, y) + ia.float().sum() * 0


def test_ids_that_also_feed_the_dense_part() -> None:
    message = run_on_ranks(1, _leaky, timeout=120)[0]
    assert "input 0" in message and "also the rest of the model" in message, message


def _leaky() -> str:
    sf.init()
    try:
        _compile(Leaky(), sf.Embeddings())
    except ValueError as e:
        return str(e)
    return "no error"
