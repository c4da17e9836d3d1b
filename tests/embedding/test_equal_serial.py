"""Sparse tables equal plain PyTorch: a DLRM with its 26 tables sharded by each placement (row, column,
table, replicated, and the planner's mix) and each fused optimizer, trained 5 steps on 1, 2 and 4 real
ranks, has the losses, parameters and ``predict`` outputs of the same model with
``nn.EmbeddingBag(sparse=True)`` trained serially by the matching torch optimizer (row-wise Adagrad: the
reference in ``cases.py``), also with a batch that does not divide by the ranks and with the next batch's ids
exchanged during each step.

The default suite runs every placement on every rank count with the optimizers rotated over them (each
optimizer meets three placements, row-wise Adagrad the column split among them); ``-m slow`` runs the whole
matrix. Tolerances: the numerics policy's (rtol 1e-4, atol 1e-5)."""

from __future__ import annotations

import pytest
import torch

import shardflow as sf
from shardflow.testing import run_on_ranks
from tests.embedding import cases

PLACEMENTS = {
    "row": {"*": "row"},
    "column": {"*": "column"},
    "table": {"*": "table"},
    "replicated": {"*": "replicated"},
}
PLACEMENTS["planner"] = None  # type: ignore[assignment]
KINDS = ("sgd", "adagrad", "adam", "rowwise")
STEPS = 5


def _train(
    work: list[tuple[str, str]], size: int, prefetch: bool = False
) -> list[tuple[list[float], dict[str, torch.Tensor], str]]:
    sf.init()
    mesh = sf.Mesh("cpu", (torch.distributed.get_world_size(),))
    out = []
    for placement, kind in work:
        pm = cases.compiled(PLACEMENTS[placement], kind, mesh, size=size)
        batches = [cases.batch(s, size) for s in range(STEPS)]
        if prefetch:  # each step exchanges the next batch's ids while its dense program runs
            losses = [pm.step(*b, next_inputs=nxt) for b, nxt in zip(batches, [*batches[1:], None])]
        else:
            losses = [pm.step(*b) for b in batches]
        chosen = ",".join(sorted({t.placement for t in pm.plan.tables.values()}))
        state = pm.full_state_dict()
        state["predict"] = pm.evaluate(*cases.batch(99, size)[:-1], method="predict")  # the plain model's predictions
        out.append((losses, state, chosen))
    return out


def _check(n: int, work: list[tuple[str, str]], size: int = 12, prefetch: bool = False) -> None:
    results = run_on_ranks(n, _train, work, size, prefetch, timeout=600)
    for (placement, kind), (losses, state, chosen) in zip(work, results[0]):
        ref_losses, ref_state = cases.reference_run(kind, STEPS, size)
        ref_state["predict"] = cases.predictions(ref_state, size)
        where = f"{placement} ({chosen}) with {kind} on {n} rank(s)"
        torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-5, msg=lambda m, w=where: f"losses, {w}: {m}")
        assert state.keys() == ref_state.keys()
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k, w=where: f"{k}, {w}: {m}")
    for r in results[1:]:  # every rank holds the same full state
        for (_, s0, _), (_, s, _) in zip(results[0], r):
            assert all(torch.equal(s0[k], s[k]) for k in s0)


def _rotated(n: int) -> list[tuple[str, str]]:
    return [(p, KINDS[(i + n) % len(KINDS)]) for i, p in enumerate(PLACEMENTS)]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_every_placement_equals_serial(n: int) -> None:
    """On 4 ranks a batch of 13 (shards of 4, 3, 3, 3 samples, tensor_split's); on 2 each step exchanges the
    next batch's ids while its dense program runs (``next_inputs``)."""
    _check(n, _rotated(n), size=13 if n == 4 else 12, prefetch=n == 2)


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 4])
def test_every_placement_and_optimizer_equals_serial(n: int) -> None:
    _check(n, [(p, k) for p in PLACEMENTS for k in KINDS])
