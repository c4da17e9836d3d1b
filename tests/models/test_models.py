"""Reference models and their data: build from tiny configs, return a scalar loss, learn, stay deterministic."""

from __future__ import annotations

import ast
import itertools
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import shardflow.models as models
from shardflow.models import (
    CHAR_VOCAB_SIZE,
    GPT,
    MLP,
    CNNConfig,
    GPTConfig,
    MLPConfig,
    SmallCNN,
    batches,
    char_corpus,
    random_classification,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TINY_GPT = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def gpt_case() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    tokens = torch.randint(TINY_GPT.vocab_size, (2000,), generator=torch.Generator().manual_seed(1))
    x, y = next(batches(tokens, batch_size=4, block_size=TINY_GPT.block_size, seed=0))
    return GPT(TINY_GPT), (x, y)


def mlp_case() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return MLP(MLPConfig(in_features=20, hidden_sizes=(32, 32), num_classes=5)), random_classification(64, 20, 5, 0)


def cnn_case() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    cfg = CNNConfig(channels=(4, 8), num_classes=5)
    return SmallCNN(cfg), random_classification(16, (3, 16, 16), 5, 0)


CASES: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "gpt": gpt_case,
    "mlp": mlp_case,
    "cnn": cnn_case,
}


@pytest.mark.parametrize("name", CASES)
def test_scalar_loss_backprops_to_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model, inputs = CASES[name]()
    loss = model(*inputs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", CASES)
def test_deterministic_under_manual_seed(name: str) -> None:
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        model, inputs = CASES[name]()
        runs.append((model.state_dict(), model(*inputs)))
    (sd_a, loss_a), (sd_b, loss_b) = runs
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        torch.testing.assert_close(sd_a[key], sd_b[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    torch.manual_seed(124)
    other, _ = CASES[name]()
    assert any(not torch.equal(a, b) for a, b in zip(sd_a.values(), other.state_dict().values()))


@pytest.mark.parametrize("name", CASES)
def test_adam_steps_on_a_fixed_batch_lower_the_loss(name: str) -> None:
    torch.manual_seed(0)
    model, inputs = CASES[name]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(*inputs)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_gpt_ties_lm_head_to_token_embedding() -> None:
    model = GPT(TINY_GPT)
    assert model.lm_head.weight is model.transformer.wte.weight
    names = dict(model.named_parameters())
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names  # listed once, under wte


def test_gpt_parameter_names_follow_nanogpt() -> None:
    names = {n for n, _ in GPT(TINY_GPT).named_parameters()}
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    for i in range(TINY_GPT.n_layer):
        for mod in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            expected |= {f"transformer.h.{i}.{mod}.weight", f"transformer.h.{i}.{mod}.bias"}
    assert names == expected
    model = GPT(TINY_GPT)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (3 * 32, 32)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (4 * 32, 32)


def test_gpt_init_is_gpt2_style() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg)
    h0 = model.transformer.h[0]
    assert abs(h0.attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(h0.mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(2 * cfg.n_layer)) < 0.001
    assert torch.count_nonzero(h0.attn.c_attn.bias) == 0


def test_gpt_loss_at_init_is_about_log_vocab() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=CHAR_VOCAB_SIZE, block_size=32, n_layer=2, n_head=4, n_embd=64)
    x, y = next(batches(char_corpus(100_000), batch_size=8, block_size=cfg.block_size, seed=0))
    loss = GPT(cfg)(x, y).item()
    assert abs(loss - math.log(cfg.vocab_size)) < 0.5, loss


def test_gpt_is_causal() -> None:
    """Changing a later token leaves the loss terms of earlier positions untouched."""
    torch.manual_seed(0)
    model, (x, y) = gpt_case()
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % TINY_GPT.vocab_size
    ya = y.clone()
    ya[:, -1] = -100  # ignore_index: score only positions before the change
    torch.testing.assert_close(model(x, ya), model(x2, ya), rtol=0, atol=0)


def test_gpt_without_bias_and_with_dropout() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16, bias=False, dropout=0.1)
    model = GPT(cfg)
    assert all(not n.endswith(".bias") for n, _ in model.named_parameters())
    x = torch.randint(32, (2, 8))
    assert not torch.equal(model(x, x), model(x, x))  # training: dropout draws fresh masks
    model.eval()
    torch.testing.assert_close(model(x, x), model(x, x), rtol=0, atol=0)
    assert model.num_params() == cfg.num_params()


def test_gpt_rejects_sequences_longer_than_block_size() -> None:
    x = torch.zeros(1, TINY_GPT.block_size + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="block_size=16"):
        GPT(TINY_GPT)(x, x)


def test_gpt_param_count_and_flops() -> None:
    model = GPT(TINY_GPT)
    assert model.num_params() == TINY_GPT.num_params()
    assert model.num_params(non_embedding=False) == TINY_GPT.num_params(non_embedding=False)
    assert TINY_GPT.num_params(non_embedding=False) - TINY_GPT.num_params() == 16 * 32
    gpt2 = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    # nanoGPT prints "number of parameters: 123.65M" for GPT-2 small; 124,439,808 is the full published count
    assert gpt2.num_params() == 123_653_376
    assert gpt2.num_params(non_embedding=False) == 124_439_808
    assert gpt2.flops_per_token() == 6 * 123_653_376 + 12 * 12 * 768 * 1024


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=3, n_embd=32), "n_embd"),
        (lambda: GPTConfig(vocab_size=0, block_size=16, n_layer=2, n_head=2, n_embd=32), "vocab_size"),
        (lambda: GPTConfig(vocab_size=64, block_size=-1, n_layer=2, n_head=2, n_embd=32), "block_size"),
        (lambda: GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=1.0), "dropout"),
        (lambda: MLPConfig(in_features=0, num_classes=3), "in_features"),
        (lambda: MLPConfig(in_features=4, hidden_sizes=(8, 0), num_classes=3), "hidden_sizes"),
        (lambda: MLPConfig(in_features=4, num_classes=3, activation="tanh"), "activation"),  # type: ignore[arg-type]
        (lambda: CNNConfig(image_size=18), "image_size"),
        (lambda: CNNConfig(channels=(4,)), "channels"),  # type: ignore[arg-type]
        (lambda: CNNConfig(num_classes=0), "num_classes"),
    ],
)
def test_config_errors_name_the_bad_field(make: Callable[[], object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make()


def test_configs_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        GPTConfig(64, 16, 2, 2, 32)  # type: ignore[misc]


def test_char_corpus_is_bytes_of_python_source() -> None:
    tokens = char_corpus()
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert 500_000 <= tokens.numel() <= 2 * 1024 * 1024
    assert 0 <= int(tokens.min()) and int(tokens.max()) < CHAR_VOCAB_SIZE
    text = bytes(tokens[:200_000].to(torch.uint8).tolist()).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text
    torch.testing.assert_close(char_corpus(1000), tokens[:1000], rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_bytes"):
        char_corpus(0)


def test_batches_are_shifted_windows_and_deterministic() -> None:
    tokens = torch.arange(1000)
    stream = list(itertools.islice(batches(tokens, batch_size=3, block_size=8, seed=7), 5))
    for x, y in stream:
        assert x.shape == y.shape == (3, 8) and x.dtype == y.dtype == torch.long
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y[:, -1], x[:, -1] + 1)  # arange: each window is consecutive tokens
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(3, 7, dtype=torch.long))
        x.view(-1), y.view(-1)  # contiguous, as GPT.forward's view needs
    again = list(itertools.islice(batches(tokens, batch_size=3, block_size=8, seed=7), 5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(stream, again))
    other = next(batches(tokens, batch_size=3, block_size=8, seed=8))
    assert not torch.equal(other[0], stream[0][0])
    # the last token can be a target
    short = next(batches(torch.arange(9), batch_size=4, block_size=8, seed=0))
    assert torch.equal(short[1], torch.arange(1, 9).expand(4, 8))
    with pytest.raises(ValueError, match="block_size"):
        batches(torch.arange(8), batch_size=1, block_size=8, seed=0)


def test_data_helpers_leave_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(batches(torch.arange(100), 2, 4, seed=1))
    random_classification(4, 3, 2, seed=1)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_random_classification() -> None:
    x, y = random_classification(256, (3, 4, 4), 5, seed=3)
    assert x.shape == (256, 3, 4, 4) and y.shape == (256,) and y.dtype == torch.long
    assert 0 <= int(y.min()) and int(y.max()) < 5 and len(y.unique()) == 5
    x2, y2 = random_classification(256, (3, 4, 4), 5, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="num_classes"):
        random_classification(4, 3, 1, seed=0)


def test_model_code_imports_only_torch() -> None:
    """The reference models stay plain PyTorch: nothing from shardflow (or transformers) inside them."""
    for name in ("gpt", "mlp", "cnn"):
        tree = ast.parse(Path(models.__file__).with_name(f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= {"__future__", "math", "dataclasses", "typing", "torch"}, (name, roots)


def test_transformers_is_not_needed() -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # any `import transformers` now raises ImportError
        "import torch; from shardflow.models import GPT, GPTConfig\n"
        "cfg = GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=8)\n"
        "x = torch.zeros(1, 4, dtype=torch.long); GPT(cfg)(x, x).backward()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
