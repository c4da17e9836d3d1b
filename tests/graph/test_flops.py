"""``pm.flops()`` on real ranks: the step's FLOPs are the same for every plan of one model and batch (dp,
tp, hybrid, ZeRO-3, recompute, pipelines), equal to the plain model's count and, for matmuls and attention,
to ``torch.utils.flop_counter`` on the plain model; each rank's share is what it computes (a data-parallel
rank half the matmuls, a tensor-parallel rank less than all), and the shares sum to at least the total."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import shardflow as sf
from shardflow.graph.flops import model_flops
from shardflow.models import GPT, GPTConfig
from shardflow.testing import run_on_ranks

# name -> (mesh shape, axis names, sf.compile keywords)
TWO = {
    "dp": ((2,), ("dp",), {"strategy": "dp"}),
    "tp": ((2,), ("tp",), {"strategy": "tp"}),
    "zero3": ((2,), ("dp",), {"strategy": "dp", "zero": 3}),
    "recompute": ((2,), ("dp",), {"strategy": "dp", "recompute": True}),
    "pipeline": ((2,), ("pp",), {"pipeline": "gpipe"}),
}
FOUR = {
    "hybrid": ((2, 2), ("dp", "tp"), {"strategy": "hybrid"}),
    "pipeline x tp": ((2, 2), ("pp", "tp"), {"strategy": "tp", "pipeline": "1f1b"}),
    "pipeline x dp": ((2, 2), ("pp", "dp"), {"pipeline": "1f1b"}),
}


def _gpt() -> tuple[GPT, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    x = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1))
    return GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)), (
        x,
        torch.roll(x, -1, 1),
    )


def _counts(plans: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    out = {}
    for name, (shape, names, kwargs) in plans.items():
        model, batch = _gpt()
        kwargs = dict(kwargs)
        if "pipeline" in kwargs:
            kwargs["pipeline"] = sf.Pipeline(micro_batches=2, schedule=kwargs["pipeline"])
        pm = sf.compile(model, sf.Mesh("cpu", shape, names=names), example_inputs=batch, **kwargs)
        f = pm.flops()
        assert f.rank is not None
        out[name] = {
            "phases": (f.forward, f.backward),
            "by_op": dict(f.by_op),
            "matmul": f.matmul_total,
            "recompute": f.recompute,
            "rank": (f.rank.total, f.rank.matmul_total, f.rank.recompute),
        }
    return out


@pytest.fixture(scope="module")
def counted() -> tuple[dict, list[dict]]:  # type: ignore[type-arg]
    model, batch = _gpt()
    plain = model_flops(model, batch)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as torch_count:
        model(*batch).backward()
    ranks = run_on_ranks(2, _counts, TWO, timeout=300) + run_on_ranks(4, _counts, FOUR, timeout=300)
    return {"plain": plain, "torch": torch_count.get_total_flops()}, ranks


def _plans(ranks: list[dict]) -> list[tuple[str, list[dict]]]:  # type: ignore[type-arg]
    two, four = ranks[:2], ranks[2:]
    return [(name, [r[name] for r in two]) for name in TWO] + [(name, [r[name] for r in four]) for name in FOUR]


def test_every_plan_counts_the_plain_model_s_step(counted) -> None:  # type: ignore[no-untyped-def]
    want, ranks = counted
    plain = want["plain"]
    assert plain.matmul_total == pytest.approx(want["torch"], rel=0.01)
    for name, per_rank in _plans(ranks):
        for got in per_rank:  # every rank reports the whole step, the same
            assert got["phases"] == (plain.forward, plain.backward), name
            assert got["by_op"] == dict(plain.by_op), name
            assert got["matmul"] == plain.matmul_total, name


def test_recomputed_forwards_are_hardware_work_not_model_work(counted) -> None:  # type: ignore[no-untyped-def]
    want, ranks = counted
    got = dict(_plans(ranks))
    dp, again = got["dp"][0], got["recompute"][0]
    # both have the attention backward's recomputed scores; checkpointing adds each block's forward again
    assert again["recompute"] > dp["recompute"] > 0
    assert again["rank"][2] > dp["rank"][2]
    assert again["rank"][:2] == dp["rank"][:2]


def test_each_rank_counts_what_it_computes(counted) -> None:  # type: ignore[no-untyped-def]
    want, ranks = counted
    plain = want["plain"]
    for name, per_rank in _plans(ranks):
        totals = [r["rank"][0] for r in per_rank]
        matmuls = [r["rank"][1] for r in per_rank]
        assert sum(totals) >= plain.total, name
        assert sum(matmuls) >= plain.matmul_total, name
        assert all(0 < m < plain.matmul_total for m in matmuls), name
    got = dict(_plans(ranks))
    # data parallel: every matmul split by rows, nothing done twice
    for name in ("dp", "zero3", "recompute"):
        assert [r["rank"][1] for r in got[name]] == [plain.matmul_total // 2] * 2, name
    # a pipeline's stages share the matmuls out, each done once (the tied head's too), by rows over dp
    for name in ("pipeline", "pipeline x dp"):
        assert sum(r["rank"][1] for r in got[name]) == plain.matmul_total, name
    # tensor parallel replicates some work (the embeddings' and the head's), splitting the blocks' matmuls
    tp = [r["rank"][1] for r in got["tp"]]
    assert plain.matmul_total < sum(tp) < 2 * plain.matmul_total
