"""A pipeline over the ``pp`` axis of a 3-D mesh ``("pp", "dp", "tp")``, with data and tensor parallelism
inside the stages, equals plain PyTorch on the GPT (losses of 5 AdamW steps with clipping, parameters after).

Why these shapes: (2, 2, 2) needs 8 ranks and the tests run on at most 4, so every 4-rank 3-D mesh with two
stages leaves one inner axis of size 1. Both are run: (2, 1, 2) puts two tensor-parallel ranks in each stage
(Megatron layouts, the stage as a lowered program, strategy "hybrid") beside a dp axis of one, and (2, 2, 1)
two data-parallel ranks in each stage beside a tp axis of one, so each inner axis is exercised with more than
one rank while the other is still named by the mesh and goes through the 3-D slicing of stages."""

from __future__ import annotations

from pathlib import Path

from shardflow.testing import run_on_ranks
from tests.runtime.test_pipeline import _cases

NAMES = ("pp", "dp", "tp")
CASES = [
    ((2, 1, 2), NAMES, "1f1b", 4, 8, None, "hybrid"),
    # a tp axis of one rank makes a stage data parallel whatever the strategy (pipeline.py: tp_mesh only when
    # tp > 1); "dp" is what the shared harness expects of such stages (the last backward split in two passes)
    ((2, 2, 1), NAMES, "gpipe", 2, 6, None, "dp"),
]


def test_pipeline_over_a_3d_mesh_equals_plain_torch(tmp_path: Path):
    checked = run_on_ranks(4, _cases, "gpt", CASES, str(tmp_path), timeout=300)
    assert len(checked[0]) == len(CASES), checked  # rank 0 is in every mesh and checked every case
