"""Snapshots of pipelines: saved from a pp x dp pipeline of the GPT (tied embeddings on two stages), loaded
into the same pipeline (the next losses bit-identical to an uninterrupted run), into a plain data-parallel
plan on 2 ranks, from a data-parallel snapshot into a pipeline, and into pipelines whose stages have 1 and 3
ranks or are tensor parallel over 2 (the next losses equal within rtol 1e-5), whose own snapshots a
data-parallel plan loads exactly: one format for every plan."""

from __future__ import annotations

from pathlib import Path

import torch

import shardflow as sf
from shardflow.testing import run_on_ranks
from tests.runtime.test_pipeline import _adamw, _model_and_batches

STEPS = 5


def _pipeline(model, data):  # type: ignore[no-untyped-def]
    mesh = sf.Mesh("cpu", (2, 2), names=("pp", "dp"))
    pipeline = sf.Pipeline(micro_batches=2, schedule="1f1b", split_points=["transformer.h.2"])
    return sf.compile(model, mesh, example_inputs=data[0], optimizer=_adamw, max_grad_norm=0.5, pipeline=pipeline)


def _uneven(model, data):  # type: ignore[no-untyped-def]
    """The same cut on stages of different sizes: one rank, then three."""
    stages = [sf.Mesh("cpu", (len(r),), names=("dp",), ranks=r) for r in ([0], [1, 2, 3])]
    pipeline = sf.Pipeline(micro_batches=2, schedule="1f1b", split_points=["transformer.h.2"], stage_meshes=stages)
    mesh = sf.Mesh("cpu", (4,), names=("pp",))
    return sf.compile(model, mesh, example_inputs=data[0], optimizer=_adamw, max_grad_norm=0.5, pipeline=pipeline)


def _tensor_parallel(model, data):  # type: ignore[no-untyped-def]
    """The same cut with each stage tensor parallel over two ranks (Megatron layouts, split shards)."""
    mesh = sf.Mesh("cpu", (2, 2), names=("pp", "tp"))
    pipeline = sf.Pipeline(micro_batches=2, schedule="1f1b", split_points=["transformer.h.2"])
    return sf.compile(
        model, mesh, example_inputs=data[0], optimizer=_adamw, max_grad_norm=0.5, pipeline=pipeline, strategy="tp"
    )


def _dp(model, data):  # type: ignore[no-untyped-def]
    mesh = sf.Mesh("cpu", (2,), names=("dp",))
    return sf.compile(model, mesh, example_inputs=data[0], optimizer=_adamw, max_grad_norm=0.5)


def _resume(root: str) -> dict[str, list[float]]:
    model, data = _model_and_batches("gpt", 8)
    whole = _pipeline(model, data)
    straight = [whole.step(*batch) for batch in data]
    first = _pipeline(model, data)
    for batch in data[:2]:
        first.step(*batch)
    first.save(f"{root}/pp", blocking=False)
    first.wait_save()
    again = _pipeline(model, data)  # fresh weights, then the snapshot
    again.load(f"{root}/pp")
    resumed = [again.step(*batch) for batch in data[2:]]
    as_dp = _dp(model, data)  # a pipeline's snapshot into a plain data-parallel plan (2 of the 4 ranks)
    as_dp.load(f"{root}/pp")
    dp_losses = [as_dp.step(*batch) for batch in data[2:]]
    plain = _dp(model, data)  # and a data-parallel snapshot into a pipeline
    for batch in data[:2]:
        plain.step(*batch)
    plain.save(f"{root}/dp")
    into_pp = _pipeline(model, data)
    into_pp.load(f"{root}/dp")
    pp_from_dp = [into_pp.step(*batch) for batch in data[2:]]
    # a pipeline's snapshot into stages of other sizes, or tensor-parallel ones, and back out of them
    other: dict[str, list[float]] = {}
    for kind, make in (("uneven", _uneven), ("tp", _tensor_parallel)):
        pm = make(model, data)
        pm.load(f"{root}/pp")
        other[kind] = [pm.step(*batch) for batch in data[2:]]
        pm.save(f"{root}/{kind}")
        out = _dp(model, data)
        out.load(f"{root}/{kind}")
        want, got = pm.full_state_dict(), out.full_state_dict()
        if torch.distributed.get_rank() < 2:  # the data-parallel plan's ranks
            for name, value in want.items():
                assert torch.equal(got[name], value), (kind, name)
    return {
        "straight": straight,
        "resumed": resumed,
        "as_dp": dp_losses,
        "pp_from_dp": pp_from_dp,
        **other,
    }


def test_pipeline_snapshots_resume_and_reshard(tmp_path: Path):
    results = run_on_ranks(4, _resume, str(tmp_path), timeout=300)
    got = results[0]
    assert got["resumed"] == got["straight"][2:]  # bit-identical
    torch.testing.assert_close(got["as_dp"], got["straight"][2:], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["pp_from_dp"], got["straight"][2:], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["uneven"], got["straight"][2:], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["tp"], got["straight"][2:], rtol=1e-5, atol=0)
    assert all(r["resumed"] == got["resumed"] for r in results)  # every rank reports the same losses
