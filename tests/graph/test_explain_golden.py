"""Golden test: the printed plan of the GPT on a 2x2 (dp, tp) mesh, and rank 0's lowered program printed
from the step IR (graph/ir/explain.py), are checked in, so a change to the rules, the strategy, boxing or
any IR pass shows up as a readable diff and fails the test; the test only reads the files.
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
PROGRAM = Path(__file__).with_name("golden") / "gpt_2x2_hybrid_rank0_program.txt"


def _explain() -> tuple[str, str]:
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
    (program,) = pm.programs.values()
    return pm.explain(), program.explain()


def _plan() -> tuple[str, str]:
    texts = run_on_ranks(4, _explain, timeout=300)
    assert all(t[0] == texts[0][0] for t in texts), "ranks printed different plans"
    return texts[0][0] + "\n", texts[0][1]


def test_gpt_plan_matches_golden():
    plan, program = _plan()
    assert plan == GOLDEN.read_text(), "plan changed; diff against tests/graph/golden/ (see docstring)"
    assert program == PROGRAM.read_text(), "rank 0's program changed; diff against tests/graph/golden/"


if __name__ == "__main__":  # the one writer of the golden file, run by hand (see the docstring)
    if sys.argv[1:] != ["--update"]:
        sys.exit(f"usage: python -m tests.graph.test_explain_golden --update  (rewrites {GOLDEN})")
    plan, program = _plan()
    GOLDEN.write_text(plan)
    PROGRAM.write_text(program)
    print(f"wrote {GOLDEN} and {PROGRAM}; review `git diff tests/graph/golden` before committing them")
