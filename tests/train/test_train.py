"""``shardflow train``: configs with clear errors, resume bit-identical to an uninterrupted run, snapshots
pruned to the last K (only shardflow's own), and the command itself on real launched ranks (with the
last step's timeline, ``--trace``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import shardflow as sf
from shardflow.runtime.trace import read
from shardflow.testing import run_on_ranks
from shardflow.train import load_config, train
from shardflow.train.loop import snapshots
from shardflow.train.models import build_model

ROOT = Path(__file__).resolve().parents[2]
SMALL = "--model.args.n_layer 1 --model.args.n_embd 32 --model.args.block_size 16 --log_every 100".split()


def _train(run_dir: str, steps: int, resume: str, extra: list[str]) -> list[float]:
    flags = ["--run_dir", run_dir, "--steps", str(steps), "--resume", resume, *SMALL, *extra]
    return train(load_config(str(ROOT / "examples" / "gpt.toml"), flags), log=lambda _: None)


@pytest.mark.parametrize(
    "ranks, mesh",
    [
        (2, ["--mesh", "2", "--axes", "dp", "--strategy", "dp"]),
        (4, "--mesh 2,2 --axes pp,dp --strategy dp --model.args.n_layer 2 --micro_batches 2".split()),
    ],
    ids=["dp", "pipeline"],
)
def test_resume_is_bit_identical(tmp_path, ranks, mesh):
    mesh = [*mesh, "--snapshot_every", "5"]
    whole = run_on_ranks(ranks, _train, str(tmp_path / "a"), 10, "never", mesh)[0]
    first = run_on_ranks(ranks, _train, str(tmp_path / "b"), 5, "auto", mesh)[0]
    rest = run_on_ranks(ranks, _train, str(tmp_path / "b"), 10, "auto", mesh)[0]
    assert len(whole) == 10 and len(first) == 5 and len(rest) == 5  # the second run started at step 6
    assert first + rest == whole  # exactly, not approximately: same plan, same reduction order (CPU)


def test_keeps_the_last_k_snapshots_and_nothing_else(tmp_path):
    run_dir = tmp_path / "run"
    foreign = run_dir / "step00000001"  # named like a snapshot, but not shardflow's: never deleted
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    flags = ["--mesh", "2", "--axes", "dp", "--strategy", "dp", "--snapshot_every", "2", "--keep_last", "2"]
    run_on_ranks(2, _train, str(run_dir), 7, "never", flags)
    assert [step for step, _ in snapshots(str(run_dir))] == [6, 7]
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not any(p.name.endswith(".partial") for p in run_dir.iterdir())


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'model.layers'"):
        load_config(None, ["--model.layers", "3"])
    with pytest.raises(ValueError, match="unknown config key 'model.args.layers'"):
        build_model(load_config(None, ["--model.args.layers", "3"]).model, 0)
    with pytest.raises(ValueError, match="'steps' must be int"):
        load_config(None, ["--steps", "many"])
    with pytest.raises(ValueError, match="same length"):
        load_config(None, ["--mesh", "2,2"])
    with pytest.raises(ValueError, match="a 'pp' axis pipelines the model with data parallel stages"):
        load_config(str(ROOT / "examples" / "gpt.toml"), ["--axes", "pp,tp"])
    cfg = load_config(str(ROOT / "examples" / "gpt.toml"), ["--model.args.n_layer", "3", "--lr", "0.01"])
    assert cfg.model.args["n_layer"] == 3 and cfg.lr == 0.01 and cfg.mesh == [2, 2]


def test_shardflow_train_and_plan_commands(tmp_path):
    exe = [sys.executable, "-m", "shardflow.cli.main"]
    flags = ["--mesh", "2", "--axes", "dp", "--strategy", "dp", *SMALL, "--steps", "3", "--log_every", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    config = str(ROOT / "examples" / "gpt.toml")
    out = subprocess.run(
        [*exe, "train", config, *flags, "--run_dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 3/3: loss" in out.stdout and "tokens/s" in out.stdout, out.stdout
    assert [s for s, _ in snapshots(str(tmp_path / "run"))] == [3]
    trace = tmp_path / "last.json"
    again = subprocess.run(
        [*exe, "train", config, *flags, "--run_dir", str(tmp_path / "run"), "--steps", "4", "--trace", str(trace)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert again.returncode == 0 and "resumed from" in again.stdout and "step 4/4" in again.stdout, again.stdout
    # the last step's timeline: every rank's events, and the PNG beside it
    assert f"timeline of step 4: {trace}" in again.stdout, again.stdout
    assert {e.rank for e in read(str(trace))} == {0, 1} and (tmp_path / "last.png").stat().st_size > 0
    saved = tmp_path / "plans" / "plan.json"
    plan = subprocess.run(
        [*exe, "plan", config, *flags, "--save", str(saved)], capture_output=True, text=True, timeout=300, env=env
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "ParallelModule" in plan.stdout and "predicted peak on rank 0" in plan.stdout, plan.stdout
    assert f"plan written to {saved}" in plan.stdout and "ParallelPlan: strategy 'dp'" in plan.stdout
    assert sf.ParallelPlan.from_json(saved.read_text()).mesh.shape == (2,)
    missing = subprocess.run(
        [*exe, "train", config, "--plan", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert missing.returncode == 2 and "none.json' cannot be read" in missing.stderr, missing.stderr
    bad = subprocess.run([*exe, "train", config, "--stepz", "3"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "unknown config key 'stepz'" in bad.stderr
