"""Checkpoints of sparse tables reshard: DLRM trained on 4 ranks with tables split by rows is saved, loaded
on 2 ranks with every table whole on one rank, saved again and loaded on 1 rank, and every step after a
load equals the uninterrupted run's; ``consolidate`` writes the plain model's state dict. Tables and their
optimizer state (row-wise Adagrad's accumulator; SparseAdam's moments, split by columns, and its step
counts) travel in the sharded safetensors format."""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file

import shardflow as sf
from shardflow.testing import run_on_ranks
from tests.embedding import cases


def _run(
    load: str | None, save: str | None, placement: Any, steps: range, kind: str = "rowwise"
) -> tuple[list[float], Any]:
    """Load ``load`` (if given), step ``steps``, save to ``save`` after the first of them (if given)."""
    sf.init()
    mesh = sf.Mesh("cpu", (torch.distributed.get_world_size(),))
    pm = cases.compiled(placement, kind, mesh, seed=1 if load else 0)  # a loaded run starts from other values
    if load:
        pm.load(load)
    losses = []
    saved = None
    for s in steps:
        losses.append(pm.step(*cases.batch(s)))
        if save and s == steps[0]:
            pm.save(save)
            saved = {k: v.clone() for k, v in pm.full_state_dict().items()}  # later steps change it in place
    return losses, saved


def test_reshard_4_row_to_2_table_to_1(tmp_path) -> None:  # type: ignore[no-untyped-def]
    first, second = str(tmp_path / "four"), str(tmp_path / "two")
    whole, _ = run_on_ranks(4, _run, None, first, {"*": "row"}, range(6), timeout=300)[0]  # saved after step 0
    losses2, state = run_on_ranks(2, _run, first, second, {"*": "table"}, range(1, 4), timeout=300)[0]
    losses1, _ = run_on_ranks(1, _run, second, None, None, range(2, 6), timeout=300)[0]
    torch.testing.assert_close(losses2, whole[1:4], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses1, whole[2:6], rtol=1e-4, atol=1e-5)
    out = os.path.join(tmp_path, "model.safetensors")
    sf.checkpoint.consolidate(second, out)
    plain = cases.model(seed=7)
    plain.load_state_dict(load_file(out))
    for k, v in plain.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_column_state_and_adam_steps_reshard_to_replicated(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SparseAdam's moments split by columns and its per-table step counts, loaded into replicated tables."""
    saved = str(tmp_path / "columns")
    whole, _ = run_on_ranks(2, _run, None, saved, {"*": "column"}, range(4), "adam", timeout=300)[0]
    after, _ = run_on_ranks(1, _run, saved, None, {"*": "replicated"}, range(1, 4), "adam", timeout=300)[0]
    torch.testing.assert_close(after, whole[1:4], rtol=1e-4, atol=1e-5)
