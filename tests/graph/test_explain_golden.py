"""Golden test: the printed plan of the GPT on a 2x2 (dp, tp) mesh is checked in, so a change to the
rules, the strategy or boxing shows up as a readable diff. Regenerate after a deliberate change with
SHARDFLOW_UPDATE_GOLDEN=1."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import shardflow as sf
from shardflow.testing import run_on_ranks
from tests.graph.test_compile import _model_and_batches

GOLDEN = Path(__file__).with_name("golden") / "gpt_2x2_hybrid.txt"


def _explain() -> str:
    model, data = _model_and_batches("gpt", 4)
    mesh = sf.Mesh("cpu", (2, 2), names=("dp", "tp"))
    pm = sf.compile(
        model,
        mesh,
        example_inputs=data[0],
        strategy="hybrid",
        optimizer=lambda ps: torch.optim.AdamW(ps, foreach=False),
    )
    pm.step(*data[0])
    return pm.explain()


def test_gpt_plan_matches_golden():
    texts = run_on_ranks(4, _explain, timeout=300)
    assert all(t == texts[0] for t in texts), "ranks printed different plans"
    if os.environ.get("SHARDFLOW_UPDATE_GOLDEN"):
        GOLDEN.write_text(texts[0] + "\n")
    assert texts[0] + "\n" == GOLDEN.read_text(), "plan changed; diff against tests/graph/golden/ (see docstring)"
