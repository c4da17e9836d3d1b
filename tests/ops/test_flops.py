"""shardflow's FLOP formulas (``ops/flops/``), on one process: the element-wise convention against counts
written out by hand for small ops, and the matmul, convolution and attention FLOPs of whole models within 1%
of ``torch.utils.flop_counter.FlopCounterMode`` measuring the plain model (its attention run by the math
kernel, which it counts as matmuls: it has no formula for the CPU attention kernel the trace holds)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from shardflow.graph.flops import model_flops
from shardflow.models import GPT, MLP, CNNConfig, GPTConfig, MLPConfig, SmallCNN
from shardflow.ops.flop_count import graph_flops
from shardflow.ops.flops import op_flops

# the convention's costs, spelt out here rather than imported, so that the test states them itself
ADD = MUL = CMP = 1
DIV = SQRT = 4
EXP = ERF = LOG = 8


def _by_op(fn, *inputs) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return dict(graph_flops(make_fx(fn)(*inputs).graph, None).by_op)


def test_layer_norm_counts_its_statistics_normalisation_and_affine_map() -> None:
    x = torch.randn(2, 4)
    ln = nn.LayerNorm(4)
    elements, rows = 8, 2
    per_element = ADD + (ADD + MUL + ADD) + (ADD + MUL) + (MUL + ADD)  # mean, variance, normalise, affine
    per_row = DIV + DIV + ADD + SQRT  # the mean's and variance's divides, + eps, rsqrt
    got = _by_op(lambda x: F.layer_norm(x, (4,), ln.weight.detach(), ln.bias.detach()), x)
    assert got == {"aten.native_layer_norm": elements * per_element + rows * per_row}


def test_gelu_softmax_and_cross_entropy_forward() -> None:
    x = torch.randn(3, 5)
    assert _by_op(F.gelu, x) == {"aten.gelu": 15 * (MUL + ERF + ADD + MUL + MUL)}  # x * 0.5 * (1 + erf(x / sqrt 2))
    assert _by_op(lambda x: F.softmax(x, -1), x) == {"aten._softmax": 15 * (CMP + ADD + EXP + ADD + DIV)}
    target = torch.tensor([0, 4, 2])
    got = _by_op(lambda x, t: F.cross_entropy(x, t), x, target)
    # log-softmax: per element max, subtract, exp, sum, subtract; per row a log; nll: pick and add 3, one divide
    assert got == {
        "aten._log_softmax": 15 * (CMP + ADD + EXP + ADD + ADD) + 3 * LOG,
        "aten.nll_loss_forward": 3 * ADD + DIV,
    }


def test_cross_entropy_backward() -> None:
    x, target = torch.randn(3, 5, requires_grad=True), torch.tensor([0, 4, 2])

    def grad(x, target):  # type: ignore[no-untyped-def]
        return torch.autograd.grad(F.cross_entropy(x, target), x)

    got = _by_op(grad, x, target)
    assert got["aten.nll_loss_backward"] == DIV + 3 * MUL  # -g / total: one divide, a multiply per target
    assert got["aten._log_softmax_backward_data"] == 15 * (ADD + EXP + MUL + ADD)  # g - exp(y) * sum(g)


def test_in_place_ops_count_as_their_functional_form_and_unknown_ops_count_as_none() -> None:
    class T:
        shape = (3, 4)

    assert op_flops(torch.ops.aten.add_.Tensor, (T(), T()), {}, [T()]) == op_flops(
        torch.ops.aten.add.Tensor, (T(), T()), {}, [T()]
    )
    assert op_flops(torch.ops.aten.view.default, (T(), [12]), {}, [T()]).total == 0  # type: ignore[union-attr]
    assert op_flops("some_op_nobody_wrote_a_formula_for", (), {}, []) is None


class Convs(nn.Module):
    """Convolutions of the kinds a formula must get right: strided, dilated, transposed, no bias, 1-d."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, dilation=2, padding=2, groups=groups, bias=False)
        self.c = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1)
        self.d = nn.Conv1d(6, 3, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.c(self.b(self.a(x)))
        return F.mse_loss(self.d(h.flatten(2)[..., :40]), y)


def test_a_grouped_convolution_counts_each_group_s_channels_only() -> None:
    """Written out: each output channel of ``Convs.b`` (4 groups) sees 2 of the 8 input channels. (torch's
    counter ignores groups in the weight's gradient: 4x too many there.)"""
    model, x = Convs(groups=4), torch.randn(2, 4, 12, 12)
    counted = model_flops(model, (x, torch.randn(2, 3, 36)))
    plain = model_flops(Convs(groups=1), (x, torch.randn(2, 3, 36)))
    positions = 6 * 6  # a's output: 12 / stride 2; b keeps it (dilation 2, padding 2)
    one_group = 2 * (2 * 8 * 2 * 3 * 3 * positions)  # batch 2, 8 outputs x 2 inputs a group x 3x3, multiply-add 2
    assert plain.matmul["aten.convolution"] - counted.matmul["aten.convolution"] == 4 * one_group - one_group
    # input and weight gradients of b: each one forward's worth
    assert plain.matmul["aten.convolution_backward"] - counted.matmul["aten.convolution_backward"] == 2 * (
        4 * one_group - one_group
    )


def _llama() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardflow.train.models import CausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    x = torch.randint(0, 64, (2, 12))
    return CausalLM(LlamaForCausalLM(config)), (x, torch.roll(x, -1, 1))


def _models() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    torch.manual_seed(0)
    x = torch.randint(0, 32, (4, 16))
    return {
        "gpt": (
            GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=24)),
            (x, torch.roll(x, -1, 1)),
        ),
        "mlp": (
            MLP(MLPConfig(in_features=8, hidden_sizes=(40, 24), num_classes=3)),
            (torch.randn(6, 8), torch.randint(0, 3, (6,))),
        ),
        "cnn": (SmallCNN(CNNConfig()), (torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))),
        "convs": (Convs(), (torch.randn(2, 4, 12, 12), torch.randn(2, 3, 36))),
        "llama": _llama(),
    }


@pytest.mark.parametrize("name", ["gpt", "mlp", "cnn", "convs", "llama"])
def test_matmul_convolution_and_attention_flops_agree_with_torch_flop_counter(name: str) -> None:
    model, inputs = _models()[name]
    counted = model_flops(model, inputs)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as torch_count:
        model(*inputs).backward()
    theirs = {str(op): n for op, n in torch_count.get_flop_counts()["Global"].items()}
    assert counted.uncounted == ()
    assert counted.matmul_total == pytest.approx(torch_count.get_total_flops(), rel=0.01)
    for op in ("aten.mm", "aten.addmm", "aten.convolution", "aten.convolution_backward"):
        assert counted.matmul.get(op, 0) == pytest.approx(theirs.get(op, 0), rel=0.01), op
    assert counted.total == counted.forward + counted.backward == sum(counted.by_op.values())
    assert counted.backward > counted.forward > 0


def _zoo() -> dict[str, tuple]:  # type: ignore[type-arg]
    """Ops beyond the reference models', each with a gradient: forward and backward must all have formulas."""
    x, w = torch.randn(2, 4, 6, 6), torch.randn(2, 8)
    ids, offsets = torch.tensor([0, 3, 3, 1, 5]), torch.tensor([0, 2])
    table = torch.randn(6, 8)
    return {
        "pow": (lambda x: (x.abs() ** x + 2.0**x + x**3 + x**0.5).sum(), x),
        "group norm, hardswish, elu": (lambda x: F.elu(F.hardswish(F.group_norm(x, 2, torch.ones(4), torch.ones(4)))).sum(), x),
        "softplus, mish, logsigmoid, glu": (lambda x: (F.softplus(x) + F.mish(x) + F.logsigmoid(x)).sum() + F.glu(x, 1).sum(), x),
        "prelu, upsampling": (lambda x: F.interpolate(F.prelu(x, torch.tensor([0.2])), scale_factor=2, mode="bilinear").sum() + F.interpolate(x, scale_factor=2).sum(), x),
        "losses": (lambda w: F.smooth_l1_loss(w, w.flip(0)) + F.huber_loss(w, w.flip(0)) + F.kl_div(w.log_softmax(-1), w.softmax(-1), reduction="batchmean") + F.binary_cross_entropy_with_logits(w, w.sigmoid()) + F.binary_cross_entropy(w.sigmoid(), w.sigmoid().detach()) + F.mse_loss(w, w.flip(0)) + F.l1_loss(w, w.flip(0)), w),
        "statistics": (lambda w: w.std() + w.var(0).sum() + torch.var_mean(w, 1)[0].sum() + w.norm() + w.logsumexp(-1).sum() + w.mean(), w),
        "embedding bags": (lambda t: sum(F.embedding_bag(ids, t, offsets, mode=m).sum() for m in ("sum", "mean", "max")) + F.embedding_bag(ids, t, offsets, per_sample_weights=torch.ones(5), mode="sum").sum(), table),
        "pools": (lambda x: F.avg_pool2d(x, 2).sum() + F.adaptive_avg_pool2d(x, 3).sum() + F.max_pool2d(x, 3).sum(), x),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_zoo()))
def test_common_ops_forward_and_backward_have_formulas(case: str) -> None:
    fn, x = _zoo()[case]

    def step(x):  # type: ignore[no-untyped-def]
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(fn(x), x)

    counted = graph_flops(make_fx(step)(x).graph, None)
    assert counted.uncounted == (), case
    assert counted.total > 0


class Checkpointed(nn.Module):
    """Two linears, checkpointed by the user (``torch.utils.checkpoint``) or not."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.a, self.b, self.checkpointed = nn.Linear(8, 8), nn.Linear(8, 8), checkpointed

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def block(t: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(t))) + t

        h = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return F.mse_loss(h, y)


def test_a_user_s_or_hugging_face_s_checkpointing_is_recomputation_not_model_work() -> None:
    x = torch.randn(4, 8)
    plain, again = model_flops(Checkpointed(False), (x, x)), model_flops(Checkpointed(True), (x, x))
    assert again.by_op == plain.by_op and (again.forward, again.backward) == (plain.forward, plain.backward)
    assert again.recompute >= 2 * 4 * 8 * 8  # at least the first linear's product again
    model, batch = _llama()
    model.model.config.use_cache = False  # as gradient checkpointing sets it
    plain = model_flops(model, batch)
    model.model.activation_checkpointing_enable({"use_reentrant": False})
    again = model_flops(model, batch)
    assert again.by_op == plain.by_op
    assert again.recompute > plain.recompute + plain.forward / 2  # the decoder layers' forwards, most of it


def test_a_count_travels_between_processes() -> None:
    """``Flops`` pickles (``all_gather_object`` of every rank's share) and adds up (a pipeline's micro-batches)."""
    import pickle

    model, batch = _models()["mlp"]
    counted = model_flops(model, batch)
    counted = counted.with_rank(counted)
    again = pickle.loads(pickle.dumps(counted))
    assert again == counted
    both = again + counted
    assert both.total == 2 * counted.total and both.by_op["aten.mm"] == 2 * counted.by_op["aten.mm"]
    assert both.rank is not None and both.rank.total == 2 * counted.total


class _Shape:
    """A tensor argument as a formula sees it: a shape (global or local) and a dtype."""

    def __init__(self, *shape: int) -> None:
        self.shape, self.dtype = shape, torch.float32


@pytest.mark.parametrize(
    ("name", "args", "outs", "want"),
    [
        # (m, k) @ (k, n) products: 2 m k n, grouped by experts, fp8, batched and summed
        ("_grouped_mm", (_Shape(10, 4), _Shape(3, 4, 6)), (_Shape(10, 6),), 2 * 10 * 4 * 6),
        ("_grouped_mm", (_Shape(3, 5, 4), _Shape(3, 4, 6)), (_Shape(3, 5, 6),), 2 * 3 * 5 * 4 * 6),
        ("_grouped_mm", (_Shape(3, 5, 4), _Shape(4, 6)), (_Shape(5, 6),), 2 * 5 * 4 * 6),
        ("_scaled_mm", (_Shape(8, 16), _Shape(16, 4)), (_Shape(8, 4),), 2 * 8 * 16 * 4),
        ("addbmm", (_Shape(5, 6), _Shape(3, 5, 4), _Shape(3, 4, 6)), (_Shape(5, 6),), 2 * 3 * 5 * 4 * 6 + 5 * 6),
        ("mv", (_Shape(5, 4), _Shape(4)), (_Shape(5),), 2 * 5 * 4),
        # group norm of (2, 4, 3) in 2 groups, affine: 8 per element, 13 per (sample, group)
        ("native_group_norm", (_Shape(2, 4, 3), _Shape(4), _Shape(4), 2, 4, 3, 2, 1e-5), (_Shape(2, 4, 3),), 24 * 8 + 4 * 13),
        # bilinear: each result a multiply and an add for each of 4 neighbours
        ("upsample_bilinear2d", (_Shape(1, 2, 3, 3), (6, 6), False), (_Shape(1, 2, 6, 6),), 72 * 8),
        ("scatter_reduce", (_Shape(5), 0, _Shape(7), _Shape(7), "mean"), (_Shape(5),), 7 * ADD + 5 * DIV),
        ("index_put", (_Shape(5, 3), [_Shape(4)], _Shape(4, 3), True), (_Shape(5, 3),), 12 * ADD),
        ("index_put", (_Shape(5, 3), [_Shape(4)], _Shape(4, 3), False), (_Shape(5, 3),), 0),
        # an embedding bag's weights' gradient: a multiply-add per looked-up element
        ("_embedding_bag_per_sample_weights_backward", (_Shape(2, 8), _Shape(6, 8), _Shape(5), _Shape(2), _Shape(5), 0), (_Shape(5),), 5 * 8 * 2),
    ],
)  # fmt: skip
def test_formulas_of_ops_the_reference_models_do_not_use(name, args, outs, want) -> None:  # type: ignore[no-untyped-def]
    from shardflow.ops.flops import FORMULAS

    assert FORMULAS[name](args, {}, outs).total == want  # called directly: an error is not hidden as "uncounted"


def test_a_gpt_s_matmuls_agree_with_the_palm_formula() -> None:
    """PaLM's (and nanoGPT's) ``6 N + 12 L d T`` per token, an independent count of a transformer's matmuls and
    attention, on a meta-device GPT (no weights): within 1% (the formula also counts biases as multiply-adds)."""
    config = GPTConfig(vocab_size=1024, block_size=256, n_layer=4, n_head=8, n_embd=256)
    with torch.device("meta"):
        model = GPT(config)
    x = torch.zeros(2, 256, dtype=torch.long)
    counted = model_flops(model, (x, x))
    assert counted.matmul_total == pytest.approx(config.flops_per_token() * x.numel(), rel=0.01)
