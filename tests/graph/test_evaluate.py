"""``pm.evaluate`` of a compiled module equals the plain model's method under ``torch.no_grad()`` in eval mode
(dropout off, BatchNorm's running statistics) for dp, tp, hybrid and ZeRO-3, static and eager, for the loss and
for another method with other inputs and a structured result; and it changes nothing: a step after it equals a
step without it, bit for bit (parameters, optimizer state, RNG)."""

from __future__ import annotations

import copy

import pytest
import torch

import shardflow as sf
from shardflow.models import GPT, MLP, CNNConfig, GPTConfig, MLPConfig, SmallCNN
from shardflow.testing import run_on_ranks
from tests.graph.test_compile import reference_step

PLANS = [  # (mesh shape, axis names, strategy, ZeRO stage)
    ((4,), ("dp",), "dp", 0),
    ((4,), ("tp",), "tp", 0),
    ((2, 2), ("dp", "tp"), "hybrid", 0),
    ((4,), ("dp",), "dp", 3),
]


class Scored(MLP):
    """An MLP with a method of one input and a structured result (a dict holding a tuple and a non-tensor)."""

    def scores(self, x: torch.Tensor) -> dict[str, object]:
        logits = self.net(x)
        return {"logits": logits, "pair": (logits.softmax(-1), logits.argmax(-1)), "classes": self.config.num_classes}


def _sgd(ps):  # type: ignore[no-untyped-def]
    return torch.optim.SGD(ps, lr=0.1, momentum=0.9)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=what)


def _equals_plain() -> list[str]:
    checked = []
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32, (6, 8), generator=gen)  # 6 rows over 4 or 2 data-parallel ranks: uneven
    rows, labels = torch.randn(6, 6, generator=gen), torch.randint(0, 5, (6,), generator=gen)
    images, classes = torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    for shape, names, strategy, zero in PLANS:
        mesh = sf.Mesh("cpu", shape, names=names)
        torch.manual_seed(0)
        gpt = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.3))
        pm = sf.compile(gpt, mesh, example_inputs=(tokens, torch.roll(tokens, -1, 1)), strategy=strategy, zero=zero)
        with torch.no_grad():
            want = gpt.eval()(tokens, torch.roll(tokens, -1, 1))
        for static in (True, False) if strategy == "hybrid" else (True,):  # eager: op by op on GlobalTensors
            pm.static = static
            got = pm.evaluate(tokens, torch.roll(tokens, -1, 1))
            _close(got, want, f"GPT loss, {strategy} zero {zero} static {static}")
            with torch.no_grad():
                logits = gpt.logits(tokens)
            _close(pm.evaluate(tokens, method="logits"), logits, f"GPT logits, {strategy} zero {zero}")
        torch.manual_seed(0)
        mlp = Scored(MLPConfig(in_features=6, hidden_sizes=(16, 12), num_classes=5))
        ref = copy.deepcopy(mlp)
        pm = sf.compile(mlp, mesh, example_inputs=(rows, labels), strategy=strategy, zero=zero, optimizer=_sgd)
        opt = _sgd(ref.parameters())
        for _ in range(2):  # evaluated after training: the parameters moved
            assert abs(pm.step(rows, labels) - reference_step(ref, opt, rows, labels, clip=1e9)) < 1e-5
        got = pm.evaluate(rows, method="scores")
        with torch.no_grad():
            want = ref.eval().scores(rows)
        assert got["classes"] == 5 and set(got) == {"logits", "pair", "classes"}
        _close(got["logits"], want["logits"], "scores' logits")
        _close(got["pair"][0], want["pair"][0], "scores' probabilities")
        assert torch.equal(got["pair"][1], want["pair"][1])
        checked.append(f"{strategy}-zero{zero}")
    # BatchNorm: evaluation normalises with the running statistics the training steps left
    torch.manual_seed(0)
    cnn = SmallCNN(CNNConfig(in_channels=3, image_size=8, channels=(4, 6), num_classes=3))
    ref = copy.deepcopy(cnn)
    pm = sf.compile(cnn, sf.Mesh("cpu", (4,), names=("dp",)), example_inputs=(images, classes), optimizer=_sgd)
    opt = _sgd(ref.parameters())
    for _ in range(2):
        pm.step(images, classes)
        reference_step(ref, opt, images, classes, clip=1e9)
    with torch.no_grad():
        ref.eval()
        _close(pm.evaluate(images, classes), ref(images, classes), "CNN loss with running statistics")
        _close(pm.evaluate(images, method="predict"), ref.predict(images), "CNN logits")
    with pytest.raises(ValueError, match="has no such method"):
        pm.evaluate(images, method="predcit")
    return checked


def test_evaluate_equals_the_plain_model_in_eval_mode():
    checked = run_on_ranks(4, _equals_plain, timeout=300)
    assert checked[0] == ["dp-zero0", "tp-zero0", "hybrid-zero0", "dp-zero3"]


def _steps(evaluate_after: int | None) -> tuple[list[float], dict[str, torch.Tensor], dict, torch.Tensor]:  # type: ignore[type-arg]
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 32, (4, 8), generator=gen)
    torch.manual_seed(0)
    # no dropout: compiled steps cannot train with it yet (evaluation's dropout-off is checked above)
    gpt = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    mesh = sf.Mesh("cpu", (2,), names=("tp",))
    make = lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False)  # noqa: E731
    pm = sf.compile(gpt, mesh, example_inputs=(tokens, tokens), strategy="tp", optimizer=make, max_grad_norm=1.0)
    losses = []
    rng = None
    for step in range(3):
        losses.append(pm.step(tokens, torch.roll(tokens, -step, 1)))
        if step == evaluate_after:
            rng = torch.get_rng_state()
            pm.evaluate(tokens, tokens)
            assert torch.equal(rng, torch.get_rng_state())
    optim = {k: v.clone() for k, v in pm.optimizer.state_dict()["state"][0].items()}
    return losses, pm.full_state_dict(), optim, torch.get_rng_state()


def _batch_norm_unchanged() -> bool:
    """An evaluation reads BatchNorm's running statistics and leaves them (training mode would update them)."""
    gen = torch.Generator().manual_seed(3)
    images, classes = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    torch.manual_seed(0)
    cnn = SmallCNN(CNNConfig(in_channels=3, image_size=8, channels=(4, 6), num_classes=3))
    pm = sf.compile(cnn, sf.Mesh("cpu", (2,), names=("dp",)), example_inputs=(images, classes), optimizer=_sgd)
    pm.step(images, classes)
    before = pm.full_state_dict()
    pm.evaluate(images, classes)
    after = pm.full_state_dict()
    return all(torch.equal(before[k], after[k]) for k in before) and "bn1.running_mean" in before


def _unchanged() -> bool:
    plain, evaluated = _steps(None), _steps(1)
    assert plain[0] == evaluated[0]  # bit for bit
    for name, value in plain[1].items():
        assert torch.equal(value, evaluated[1][name]), name
    for key, value in plain[2].items():
        assert torch.equal(value, evaluated[2][key]), key
    assert torch.equal(plain[3], evaluated[3])
    return _batch_norm_unchanged()


def test_evaluate_changes_nothing_a_step_sees():
    assert run_on_ranks(2, _unchanged, timeout=120) == [True, True]
