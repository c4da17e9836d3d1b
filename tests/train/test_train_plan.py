"""``shardflow train CONFIG --plan plan.json``: a saved plan wins over the config's mesh and strategy keys
(same losses, bit for bit, as the run that made it), sets the job's ranks, and one for another job size
is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardflow.testing import run_on_ranks
from shardflow.train.config import job_ranks
from tests.train.test_train import ROOT, _train

DP_ZERO1 = ["--mesh", "2", "--axes", "dp", "--strategy", "dp", "--zero", "1"]
HYBRID = ["--mesh", "2,2", "--axes", "dp,tp", "--strategy", "hybrid"]  # what the plan overrides


def _plan(path: str) -> None:
    import torch.distributed as dist

    from shardflow.train.config import load_config
    from shardflow.train.loop import compile_run

    pm = compile_run(load_config(str(ROOT / "examples" / "gpt.toml"), [*DP_ZERO1, "--model.args.n_layer", "1"])).pm
    if dist.get_rank() == 0:
        Path(path).write_text(pm.plan.to_json())


def test_a_saved_plan_wins_over_the_config(tmp_path):
    saved = str(tmp_path / "plan.json")
    small = ["--model.args.n_layer", "1"]
    run_on_ranks(2, _plan, saved)
    written = json.loads(Path(saved).read_text())
    assert written["params"]["transformer.h.0.mlp.c_fc.weight"]["optim"] == ["S(0)"]  # ZeRO-1's piece
    config = str(ROOT / "examples" / "gpt.toml")
    from shardflow.train.config import load_config

    assert job_ranks(load_config(config, [*HYBRID, "--plan", saved])) == 2  # the plan's mesh, not the config's 4
    planned = run_on_ranks(2, _train, str(tmp_path / "a"), 3, "never", [*HYBRID, *small, "--plan", saved])[0]
    direct = run_on_ranks(2, _train, str(tmp_path / "b"), 3, "never", [*DP_ZERO1, *small])[0]
    assert planned == direct and len(planned) == 3


def test_a_plan_for_another_job_size_is_refused(tmp_path):
    saved = tmp_path / "plan.json"
    run_on_ranks(2, _plan, str(saved))
    raw = json.loads(saved.read_text())
    raw["mesh"].update(shape=[4], ranks=[0, 1, 2, 3])
    saved.write_text(json.dumps(raw))
    with pytest.raises(Exception, match="is for a cpu mesh \\(dp=4\\) \\(ranks up to 3\\); the job has 2 ranks"):
        run_on_ranks(2, _train, str(tmp_path / "c"), 1, "never", ["--model.args.n_layer", "1", "--plan", str(saved)])
