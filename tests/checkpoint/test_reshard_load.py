"""``pm.load`` into another plan than the one that saved: a ZeRO-3 snapshot (parameters and optimizer state
split over dp) into dp without ZeRO and into hybrid, a dp snapshot into tp and into hybrid. After loading,
3 more AdamW steps with clipping equal a plain PyTorch run of all 5 steps, so the parameters, the AdamW
moments and step counts must all have come back in the new layouts (the fp32 tolerances)."""

from __future__ import annotations

import copy

import pytest
import torch

import shardflow as sf
from shardflow.testing import run_on_ranks
from tests.graph.test_compile import _model_and_batches, train_and_compare

SAVED_AT = 2  # steps before the snapshot; the rest of the 5 batches train after loading


def _adamw(ps):  # type: ignore[no-untyped-def]
    return torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, foreach=False)


def _compiled(model: torch.nn.Module, example, plan: tuple) -> sf.ParallelModule:  # type: ignore[type-arg]
    shape, names, strategy, zero = plan
    mesh = sf.Mesh("cpu", shape, names=names)
    return sf.compile(
        model, mesh, example_inputs=example, strategy=strategy, zero=zero, optimizer=_adamw, max_grad_norm=0.5
    )


def _save_then_load(directory: str, saved: tuple, loaded: list[tuple]) -> int:  # type: ignore[type-arg]
    model, data = _model_and_batches("gpt", 6)  # 6 rows over 4 dp ranks: uneven shards
    ref = copy.deepcopy(model)
    opt = _adamw(ref.parameters())
    pm = _compiled(model, data[0], saved)
    train_and_compare(pm, ref, opt, data[:SAVED_AT])
    pm.save(directory)
    done = 0
    for plan in loaded:
        # the reference from the snapshot on (deep-copied together, so the optimizer's state keeps its parameters)
        ref_then, opt_then = copy.deepcopy((ref, opt))
        other = _compiled(copy.deepcopy(model), data[0], plan)  # the untrained weights until it loads
        other.load(directory)
        assert other.steps == SAVED_AT
        train_and_compare(other, ref_then, opt_then, data[SAVED_AT:])
        done += 1
    return done


DP4 = ((4,), ("dp",), "dp", 0)
TP4 = ((4,), ("tp",), "tp", 0)
HYBRID = ((2, 2), ("dp", "tp"), "hybrid", 0)
ZERO3 = ((4,), ("dp",), "dp", 3)


@pytest.mark.parametrize(
    "saved, loaded",
    [(ZERO3, [DP4, HYBRID]), (DP4, [TP4, HYBRID])],
    ids=["zero3-into-dp-and-hybrid", "dp-into-tp-and-hybrid"],
)
def test_load_into_another_plan_trains_on_equal_to_plain_torch(tmp_path, saved, loaded):
    # every rank loaded and trained on in every plan
    assert run_on_ranks(4, _save_then_load, str(tmp_path / "snap"), saved, loaded, timeout=300) == [len(loaded)] * 4
