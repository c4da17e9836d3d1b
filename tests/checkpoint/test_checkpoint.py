"""Checkpoints on real ranks: save a 2x2 hybrid GPT run, load it on 2 ranks as dp and on 1 rank, and the
next losses equal the uninterrupted run's; the consolidated file loads into the plain model; damaged or
foreign checkpoints give clear errors; a save that crashes leaves the previous snapshot loadable."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import shardflow as sf
from shardflow.checkpoint.index import CheckpointError
from shardflow.models import GPT, MLP, GPTConfig, MLPConfig
from shardflow.testing import run_on_ranks

CFG = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)


def _batches():
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randint(0, 32, (4, 8), generator=gen) for _ in range(5)]
    return [(x, torch.roll(x, -1, 1)) for x in xs]


def _compiled(shape, names, strategy, zero=0):
    torch.manual_seed(0)
    model = GPT(CFG)
    mesh = sf.Mesh("cpu", shape, names=names)
    make = lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, foreach=False)  # noqa: E731
    return model, sf.compile(
        model, mesh, example_inputs=_batches()[0], strategy=strategy, optimizer=make, max_grad_norm=1.0, zero=zero
    )


def _save_run(directory: str) -> list[float]:
    _, pm = _compiled((2, 2), ("dp", "tp"), "hybrid", zero=2)  # optimizer state split over dp and tp
    data = _batches()
    for x, y in data[:2]:
        pm.step(x, y)
    pm.save(directory)
    return [pm.step(x, y) for x, y in data[2:]]


def _resume(directory: str, shape, names, strategy) -> list[float]:
    _, pm = _compiled(shape, names, strategy)
    pm.load(directory)
    assert pm.steps == 2
    return [pm.step(x, y) for x, y in _batches()[2:]]


def test_save_on_4_load_on_2_and_1_and_consolidate(tmp_path):
    ckpt = str(tmp_path / "step2")
    want = run_on_ranks(4, _save_run, ckpt)[0]
    assert json.load(open(os.path.join(ckpt, "index.json")))["meta"]["step"] == 2
    for world, shape, names, strategy in [(2, (2,), ("dp",), "dp"), (1, (1,), ("dp",), "dp")]:
        got = run_on_ranks(world, _resume, ckpt, shape, names, strategy)[0]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    out = str(tmp_path / "model.safetensors")
    sf.checkpoint.consolidate(ckpt, out)
    torch.manual_seed(0)
    plain = GPT(CFG)
    plain.load_state_dict(load_file(out))  # strict: every key, tied lm_head included
    assert torch.equal(plain.lm_head.weight, plain.transformer.wte.weight)
    x, y = _batches()[2]
    assert abs(plain(x, y).item() - want[0]) <= 1e-5 * abs(want[0])  # the loss the resumed step reported


def _async_save_run(directory: str) -> tuple[list[float], bool]:
    _, pm = _compiled((2, 2), ("dp", "tp"), "hybrid")
    data = _batches()
    for x, y in data[:2]:
        pm.step(x, y)
    pm.save(directory, blocking=False)  # the snapshot is the state now; training goes on meanwhile
    in_flight = pm.saving is not None
    losses = [pm.step(x, y) for x, y in data[2:]]  # these steps change every parameter in place
    pm.wait_save()
    return losses, in_flight


def test_background_save_snapshots_the_state_at_the_call(tmp_path):
    ckpt = str(tmp_path / "step2")
    results = run_on_ranks(4, _async_save_run, ckpt)
    want, in_flight = results[0]
    assert in_flight
    assert not os.path.exists(ckpt + ".partial") and json.load(open(os.path.join(ckpt, "index.json")))
    got = run_on_ranks(2, _resume, ckpt, (2,), ("dp",), "dp")[0]  # resumes from step 2, not 5
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)


def _rng_roundtrip(directory: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, pm = _compiled((2,), ("dp",), "dp")
    torch.manual_seed(100 + torch.distributed.get_rank())  # every rank's generator in its own state
    pm.save(directory)
    want = torch.rand(4)  # what this rank draws next after the snapshot
    torch.manual_seed(12345)
    pm.load(directory)
    return want, torch.rand(4)


def test_snapshot_restores_every_ranks_random_state(tmp_path):
    results = run_on_ranks(2, _rng_roundtrip, str(tmp_path / "ckpt"))
    for want, got in results:
        assert torch.equal(want, got)
    assert not torch.equal(results[0][0], results[1][0])  # each rank got its own state back, not rank 0's


def _damage_checks(directory: str) -> None:
    _, pm = _compiled((1,), ("dp",), "dp")
    pm.save(directory)
    shard = os.path.join(directory, "rank00000.safetensors")
    data = bytearray(open(shard, "rb").read())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    open(shard, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="rank00000.safetensors is truncated or was changed"):
        pm.load(directory)
    open(shard, "wb").write(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="truncated or was changed"):
        pm.load(directory)
    os.remove(shard)
    with pytest.raises(CheckpointError, match="rank00000.safetensors is missing"):
        pm.load(directory)
    index = json.load(open(os.path.join(directory, "index.json")))
    index["version"] = 99
    json.dump(index, open(os.path.join(directory, "index.json"), "w"))
    with pytest.raises(CheckpointError, match="format version 99, newer than this shardflow reads"):
        pm.load(directory)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        pm.load(directory + "-nowhere")


def _foreign_model(directory: str) -> None:
    _, pm = _compiled((1,), ("dp",), "dp")
    pm.save(directory)
    torch.manual_seed(0)
    mlp = MLP(MLPConfig(in_features=4, hidden_sizes=(8,), num_classes=3))
    other = sf.compile(mlp, sf.Mesh("cpu", (1,)), example_inputs=(torch.randn(2, 4), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(CheckpointError, match="saved from another model"):
        other.load(directory)


def _crash_during_save(directory: str) -> None:
    _, pm = _compiled((1,), ("dp",), "dp")
    pm.save(directory)
    before = {n: t.clone() for n, t in pm.full_state_dict().items()}
    x, y = _batches()[0]
    pm.step(x, y)
    real = os.rename

    def crash(src, dst):  # type: ignore[no-untyped-def]
        raise OSError("simulated crash while swapping the snapshot in")

    os.rename = crash
    try:
        with pytest.raises(OSError, match="simulated crash"):
            pm.save(directory)
    finally:
        os.rename = real
    pm.load(directory)  # the previous snapshot, whole
    for name, value in pm.full_state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("body", [_damage_checks, _foreign_model, _crash_during_save])
def test_bad_checkpoints(tmp_path, body):
    run_on_ranks(1, body, str(tmp_path / "ckpt"))
