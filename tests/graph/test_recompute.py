"""Activation recompute: blocks wrapped in non-reentrant checkpointing are traced with their forward run
again inside backward, so the lowered program frees their activations after forward and recomputes them.
Equal to serial PyTorch; predicted and measured (allocator) peaks fall; ``recompute="auto"`` recomputes the
fewest leading blocks that fit ``memory_limit``, and a plan that does not fit names recompute as a fix."""

from __future__ import annotations

import copy

import pytest
import torch

import shardflow as sf
from shardflow.models import GPT, GPTConfig
from shardflow.testing import run_on_ranks
from shardflow.testing.memory import measure_built
from tests.graph.test_compile import _model_and_batches, train_and_compare


def _adamw(ps):  # type: ignore[no-untyped-def]
    return torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, foreach=False)


def _equal_serial(strategy: str) -> list[str]:
    model, data = _model_and_batches("gpt", 8)
    ref = copy.deepcopy(model)
    opt = _adamw(ref.parameters())
    mesh = sf.Mesh("cpu", (2,), names=(strategy,))
    pm = sf.compile(model, mesh, data[0], strategy=strategy, recompute=True, optimizer=_adamw, max_grad_norm=0.5)
    train_and_compare(pm, ref, opt, data)
    return pm.recomputed


@pytest.mark.parametrize("strategy", ["dp", "tp"])
def test_recompute_equals_plain_torch(strategy):
    assert run_on_ranks(2, _equal_serial, strategy, timeout=300)[0] == ["transformer.h.0", "transformer.h.1"]


def _deep_gpt():  # type: ignore[no-untyped-def]
    """Long sequences and four blocks: activations dominate, as in real training."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=4, n_head=2, n_embd=32))
    x = torch.randint(0, 64, (8, 64), generator=torch.Generator().manual_seed(1))
    return model, (x, torch.roll(x, -1, 1))


def _peaks() -> dict[str, tuple[int, int, list[str]]]:
    model, batch = _deep_gpt()
    mesh = sf.Mesh("cpu", (2,), names=("dp",))
    out = {}
    for recompute in (False, True):
        pm, measured = measure_built(
            lambda r=recompute: sf.compile(model, mesh, batch, recompute=r, optimizer=_adamw), *batch
        )
        out[str(recompute)] = (pm.memory().peak, measured.peak, pm.recomputed)
    keep, redo = out["False"][0], out["True"][0]
    limit = (keep + redo) // 2  # between: some blocks, not necessarily all
    auto = sf.compile(model, mesh, batch, recompute="auto", memory_limit=limit, optimizer=_adamw)
    out["auto"] = (auto.memory().peak, limit, auto.recomputed)
    with pytest.raises(sf.MemoryPlanError, match=r"recompute=True \(every block's activations recomputed"):
        sf.compile(model, mesh, batch, memory_limit=redo + (keep - redo) // 4, optimizer=_adamw)
    return out


def test_recompute_lowers_predicted_and_measured_peaks():
    got = run_on_ranks(2, _peaks, timeout=300)[0]
    (keep_pred, keep_meas, _), (redo_pred, redo_meas, blocks) = got["False"], got["True"]
    assert blocks == [f"transformer.h.{i}" for i in range(4)]
    for pred, meas in ((keep_pred, keep_meas), (redo_pred, redo_meas)):
        assert abs(pred - meas) <= 0.1 * meas, (pred, meas)
    assert redo_pred < 0.9 * keep_pred and redo_meas < 0.9 * keep_meas, got
    auto_pred, limit, chosen = got["auto"]
    assert auto_pred <= limit and 0 < len(chosen) <= 4 and chosen == blocks[: len(chosen)], got["auto"]


def test_recompute_arguments_are_checked():
    model, batch = _deep_gpt()
    mesh = sf.Mesh("cpu", (1,), names=("dp",))
    with pytest.raises(ValueError, match="recompute='auto' recomputes the fewest blocks that fit memory_limit"):
        sf.compile(model, mesh, batch, recompute="auto")
    with pytest.raises(ValueError, match=r"recompute globs \['blocks\.\*'\] match no module of GPT"):
        sf.compile(model, mesh, batch, recompute=["blocks.*"])


def _leading_blocks_and_auto() -> tuple[list[int], dict[int, list[str]]]:
    """The predicted peak with the first ``k`` blocks recomputed, each compiled with ``recompute=[their
    names]``, for k = 0..4; then what ``"auto"`` picks at each of those peaks taken as the limit."""
    model, batch = _deep_gpt()
    mesh = sf.Mesh("cpu", (2,), names=("dp",))
    every = [f"transformer.h.{i}" for i in range(4)]
    peaks = []
    for k in range(len(every) + 1):
        # exact names as globs: a block's name does not match its children's
        pm = sf.compile(model, mesh, batch, recompute=every[:k] or False, optimizer=_adamw)
        assert pm.recomputed == every[:k], (pm.recomputed, k)
        peaks.append(max(pm.memory().peaks))
    chosen = {}
    for limit in peaks[1:-1]:  # 0 and all 4 are the search's ends; the mutants of one block more or less show inside
        # compiling with a limit refuses a choice over it (MemoryPlanError), so what returns fits
        chosen[limit] = sf.compile(
            model, mesh, batch, recompute="auto", memory_limit=limit, optimizer=_adamw
        ).recomputed
    return peaks, chosen


def test_auto_recomputes_the_fewest_blocks_found_by_brute_force():
    """``recompute="auto"`` promises the fewest leading blocks (earlier first) that fit the limit: every count
    is priced by compiling it, and at each count's peak as the limit auto must pick exactly the smallest count
    whose peak is under it (a search that stops one block early is refused by the limit; one late, by this)."""
    peaks, chosen = run_on_ranks(2, _leading_blocks_and_auto, timeout=480)[0]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks), peaks  # each block saves
    every = [f"transformer.h.{i}" for i in range(4)]
    for limit, blocks in chosen.items():
        fewest = min(k for k, p in enumerate(peaks) if p <= limit)
        assert blocks == every[:fewest], (limit, blocks, fewest, peaks)
