"""``shardflow train`` config keys no other test sets: ``resume`` given a snapshot path, ``zero`` (trained
against plain PyTorch, and the snapshot's parameters really split over the dp ranks), ``memory_limit`` (a
limit below the parameters' own bytes is refused before any step, exit code non-zero with the message) and
``peak_tflops`` (every log line's FLOP/s is the step's counted FLOPs over its time, and its MFU that over the
job's peak)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import shardflow as sf
from shardflow.graph.flops import model_flops
from shardflow.models import GPT, GPTConfig
from shardflow.testing import run_on_ranks
from shardflow.train import load_config, train
from shardflow.train.data import make_batches
from shardflow.train.loop import snapshots
from shardflow.train.models import build_model
from tests.graph.test_compile import reference_step
from tests.train.test_train import ROOT, SMALL, _train

CONFIG = str(ROOT / "examples" / "gpt.toml")
DP = ["--mesh", "2", "--axes", "dp", "--strategy", "dp"]


def test_resume_from_a_given_snapshot_path_continues_bit_identical(tmp_path):
    # step 3 of run a, resumed into an empty run_dir b: "auto" would find nothing there, and a's newest is step 6
    flags = [*DP, "--snapshot_every", "3", "--keep_last", "2"]
    whole = run_on_ranks(2, _train, str(tmp_path / "a"), 6, "never", flags)[0]
    assert [s for s, _ in snapshots(str(tmp_path / "a"))] == [3, 6]
    rest = run_on_ranks(2, _train, str(tmp_path / "b"), 6, str(tmp_path / "a" / "step00000003"), flags)[0]
    assert rest == whole[3:]  # exactly: same plan, same reduction order (CPU)


def test_zero_trains_like_plain_torch_with_parameters_split_over_dp(tmp_path):
    flags = [*SMALL, *DP, "--zero", "3", "--steps", "3", "--run_dir", str(tmp_path / "run"), "--resume", "never"]
    got = run_on_ranks(2, train, load_config(CONFIG, flags), timeout=300)[0]
    cfg = load_config(CONFIG, flags)
    torch.manual_seed(cfg.seed)
    ref = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=4, n_embd=32))  # SMALL's GPT
    batches = make_batches(cfg.data, cfg.batch_size, cfg.seed, 16).train(0)
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, eps=1e-6, foreach=False)
    want = [reference_step(ref, opt, *next(batches), clip=cfg.max_grad_norm) for step in range(3)]
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= 1e-5 + 1e-4 * abs(w), (got, want)
    saved = str(tmp_path / "run" / "step00000003")
    sf.checkpoint.consolidate(saved, str(tmp_path / "model.safetensors"))
    state = load_file(str(tmp_path / "model.safetensors"))
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # ZeRO-3 splits the parameters themselves: each rank saved its own half of every matrix (replicated
    # parameters are saved once, by the first replica)
    with open(os.path.join(saved, "index.json")) as f:
        tensors = json.load(f)["tensors"]
    weights = [n for n, p in ref.named_parameters() if p.dim() == 2 and "model." + n in tensors]
    assert weights and all(len(tensors["model." + n]["shards"]) == 2 for n in weights), tensors


def test_a_memory_limit_too_small_is_refused_before_training(tmp_path):
    # 64 KiB is under the bytes of the parameters alone (a lower bound on the one rank's memory); one rank: the
    # launch is the test's cost
    one = ["--mesh", "1", "--axes", "dp", "--strategy", "dp"]
    small = build_model(load_config(CONFIG, SMALL).model, 0).module
    assert sum(p.numel() * p.element_size() for p in small.parameters()) > 64 * 1024
    run_dir = tmp_path / "run"
    flags = [*SMALL, *one, "--steps", "2", "--log_every", "1", "--run_dir", str(run_dir), "--memory_limit", "64KiB"]
    out = subprocess.run(
        [sys.executable, "-m", "shardflow.cli.main", "train", CONFIG, *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    said = out.stdout + out.stderr
    assert out.returncode != 0, said[-3000:]
    # the launcher's one line for the failed rank is the refusal itself, not the last change it priced
    refusal = "MemoryPlanError: the plan does not fit memory_limit=64.00 KiB: rank 0 would peak at"
    assert f"shardflow: rank 0 failed (exit code 1): {refusal}" in out.stderr, said[-3000:]
    assert "step 1/2" not in said and not snapshots(str(run_dir)), said[-3000:]


def _logged(flags: list[str]) -> list[str]:
    lines: list[str] = []
    train(load_config(CONFIG, flags), log=lines.append)
    return lines


def test_every_log_line_shows_the_counted_flop_rate_and_the_mfu_over_the_job_s_peak(tmp_path):
    peak = 1e-4  # TFLOP/s of one device: 0.1 GFLOP/s, so the MFU figure is large and precise on any CPU
    flags = [*SMALL, *DP, "--steps", "2", "--log_every", "1", "--peak_tflops", str(peak), "--resume", "never"]
    lines = run_on_ranks(2, _logged, [*flags, "--run_dir", str(tmp_path / "run")], timeout=300)[0]
    pattern = r"([0-9,]+) tokens/s, ([0-9.]+) ([kMGT]?)FLOP/s, MFU ([0-9.]+)%"
    figures = [re.search(pattern, line) for line in lines if line.startswith("step ")]
    assert len(figures) == 2 and all(figures), lines
    # the step's FLOPs, counted independently: the plain model's step on one batch (8 sequences of 16)
    cfg = load_config(CONFIG, flags)
    x = torch.zeros(cfg.batch_size, 16, dtype=torch.long)
    per_step = model_flops(build_model(cfg.model, cfg.seed).module, (x, x)).total
    scale = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for found in figures:
        assert found is not None
        tokens, flops = float(found.group(1).replace(",", "")), float(found.group(2)) * scale[found.group(3)]
        mfu = float(found.group(4)) / 100
        # both rates are of one step's time: their ratio is the step's FLOPs per token (FLOP/s has 3 digits)
        assert flops / tokens == pytest.approx(per_step / x.numel(), rel=0.01), lines
        job_peak = peak * 1e12 * 2  # the peak of one device times the job's 2 ranks
        assert mfu == pytest.approx(flops / job_peak, rel=0.01, abs=0.0005), lines
