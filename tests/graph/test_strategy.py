"""Strategy and hints, in one process: Megatron pairs found on an unmodified GPT and only where the column
split survives the ops between the pair, clear errors."""

import pytest
import torch

import shardflow as sf
from shardflow.graph.capture import capture
from shardflow.graph.strategy import megatron_pairs, megatron_placements
from shardflow.graph.transforms import param_layouts
from shardflow.models import GPT, MLP, GPTConfig, MLPConfig


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16))
    x = torch.randint(0, 32, (2, 8))
    return model, capture(model, (x, x))


def test_megatron_pairs_of_a_gpt(gpt):
    _, captured = gpt
    pairs = sorted(megatron_pairs(captured))
    want = []
    for i in range(2):
        h = f"transformer.h.{i}"
        want += [
            (f"{h}.attn.c_attn.weight", f"{h}.attn.c_proj.weight"),
            (f"{h}.mlp.c_fc.weight", f"{h}.mlp.c_proj.weight"),
        ]
    assert pairs == sorted(want)


def test_tp_layouts_and_hints(gpt):
    model, captured = gpt
    mesh = sf.Mesh("cpu", (2, 2), names=("dp", "tp"))
    layouts = param_layouts(model, mesh, "hybrid", captured, hints={"transformer.wte.weight": (sf.B, sf.S(1))})
    assert layouts["transformer.h.0.mlp.c_fc.weight"] == (sf.B, sf.S(0))
    assert layouts["transformer.h.0.mlp.c_fc.bias"] == (sf.B, sf.S(0))
    assert layouts["transformer.h.0.mlp.c_proj.weight"] == (sf.B, sf.S(1))
    assert layouts["transformer.h.0.mlp.c_proj.bias"] == (sf.B, sf.B)
    assert layouts["transformer.wte.weight"] == (sf.B, sf.S(1))
    # the fused q/k/v projection: each rank holds its heads of each of the 3 blocks (nn.Linear: [out, in])
    assert layouts["transformer.h.0.attn.c_attn.weight"] == (sf.B, sf.Blocked(0, 3))
    assert layouts["transformer.h.0.attn.c_attn.bias"] == (sf.B, sf.Blocked(0, 3))
    assert layouts["transformer.h.0.attn.c_proj.weight"] == (sf.B, sf.S(1))


def test_errors(gpt):
    model, captured = gpt
    mesh = sf.Mesh("cpu", (2,), names=("tp",))
    with pytest.raises(ValueError, match="hint 'blocks.*' matches no parameter"):
        param_layouts(model, mesh, "tp", captured, hints={"blocks.*": sf.S(0)})
    with pytest.raises(ValueError, match="does not fit parameter 'transformer.h.0.ln_1.bias' of shape \\(16,\\)"):
        param_layouts(model, mesh, "tp", captured, hints={"transformer.h.0.ln_1.bias": sf.S(1)})
    with pytest.raises(
        ValueError, match="Blocked\\(0, 5\\) does not fit parameter 'transformer.h.0.attn.c_attn.weight'"
    ):
        param_layouts(model, mesh, "tp", captured, hints={"transformer.h.0.attn.c_attn.weight": sf.Blocked(0, 5)})
    with pytest.raises(ValueError, match="strategy must be one of"):
        param_layouts(model, mesh, "zero", captured)
    with pytest.raises(ValueError, match="needs mesh axes named 'dp' and 'tp'"):
        param_layouts(model, mesh, "hybrid", captured)


def test_forward_must_return_a_scalar():
    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x, y):
            return self.lin(x)

    with pytest.raises(ValueError, match="must return one scalar loss tensor, got \\[\\(5, 3\\)\\]"):
        capture(Logits(), (torch.randn(5, 4), torch.zeros(5)))


def test_mlp_has_one_pair():
    model = MLP(MLPConfig(in_features=6, hidden_sizes=(8,), num_classes=3))
    x = torch.randn(4, 6)
    pairs = megatron_pairs(capture(model, (x, torch.zeros(4, dtype=torch.long))))
    assert pairs == [("net.0.weight", "net.2.weight")]


def test_input_sbp_forms():
    from shardflow.graph.transforms import input_layouts

    def _input_layouts(sbp, mesh, n):  # type: ignore[no-untyped-def]
        return input_layouts(sbp, mesh.ndim, n)

    m1, m2 = sf.Mesh("cpu", (2,)), sf.Mesh("cpu", (2, 2))
    assert _input_layouts(sf.S(0), m1, 2) == [(sf.S(0),), (sf.S(0),)]
    assert _input_layouts((sf.S(0), sf.B), m2, 2) == [(sf.S(0), sf.B)] * 2  # one nd-SBP for every input
    assert _input_layouts([(sf.S(0), sf.B), (sf.B, sf.B)], m2, 2) == [(sf.S(0), sf.B), (sf.B, sf.B)]
    assert _input_layouts([sf.S(0), sf.B], m1, 2) == [(sf.S(0),), (sf.B,)]  # one per input on a 1-d mesh
    with pytest.raises(ValueError, match="neither one layout for every input nor one layout per input"):
        _input_layouts([sf.S(0), sf.B, sf.B], m1, 2)


class _Pair(torch.nn.Module):
    def __init__(self, body, width: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.fc1, self.fc2, self.body = torch.nn.Linear(6, 8), torch.nn.Linear(width, 3), body

    def forward(self, x, y):  # type: ignore[no-untyped-def]
        return torch.nn.functional.cross_entropy(self.fc2(self.body(self.fc1(x))), y)


@pytest.mark.parametrize(
    "body, width, want",
    [
        (lambda h: torch.nn.functional.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1], 4, sf.Blocked(0, 2)),  # fused GLU
        (lambda h: h.view(5, 2, 4).transpose(0, 1).softmax(-1).transpose(0, 1).reshape(5, 8), 8, sf.S(0)),  # heads
        (lambda h: h[:, :4] * h[:, 4:].sigmoid(), 4, None),  # slices of the split dim
        (lambda h: h.softmax(-1), 8, None),  # a softmax over it
        (lambda h: h.view(5, 4, 2).transpose(1, 2).reshape(5, 8), 8, None),  # features reordered across it
    ],
)
def test_pairs_follow_the_split_dim(body, width, want):
    """fc1 is column-parallel only where its feature split reaches fc2's input features intact (2 ways)."""
    model = _Pair(body, width)
    x = torch.randn(5, 6)
    got = megatron_placements(capture(model, (x, torch.zeros(5, dtype=torch.long))), [], 2)
    assert got == ({} if want is None else {"fc1.weight": want, "fc2.weight": sf.S(1)}), got
