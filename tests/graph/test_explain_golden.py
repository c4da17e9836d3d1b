"""Golden test: the printed plan of the GPT on a 2x2 (dp, tp) mesh is checked in, so a change to the
rules, the strategy or boxing shows up as a readable diff and fails the test; the test only reads the file.
Regenerate after a deliberate change, then review the diff before committing it:

    .venv/bin/python -m tests.graph.test_explain_golden --update
"""

from __future__ import annotations

import sys
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


def _plan() -> str:
    texts = run_on_ranks(4, _explain, timeout=300)
    assert all(t == texts[0] for t in texts), "ranks printed different plans"
    return texts[0] + "\n"


def test_gpt_plan_matches_golden():
    assert _plan() == GOLDEN.read_text(), "plan changed; diff against tests/graph/golden/ (see docstring)"


if __name__ == "__main__":  # the one writer of the golden file, run by hand (see the docstring)
    if sys.argv[1:] != ["--update"]:
        sys.exit(f"usage: python -m tests.graph.test_explain_golden --update  (rewrites {GOLDEN})")
    GOLDEN.write_text(_plan())
    print(f"wrote {GOLDEN}; review `git diff {GOLDEN}` before committing it")
