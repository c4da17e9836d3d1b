"""A backward split in two passes (inputs' gradients, then weights') equals one plain backward: the same
input and parameter gradients, accumulated onto earlier ones, no parameter gradient before the second pass,
each post-accumulate hook once; and no split where one could compute or count something twice. The memory
plan counts what the split holds between its passes."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from shardflow.graph.stage_program import trace_stage
from shardflow.models import GPTConfig
from shardflow.models.gpt import Block
from shardflow.runtime.split_backward import held_between_passes, plan
from tests.runtime.custom_ops import BACKWARDS, scaled


class Stage(nn.Module):
    """Two inputs, three outputs: one through Linear/ReLU/LayerNorm, one through a product of both inputs,
    one from a parameter alone (off the inputs' side: the second pass runs it from its root)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.ln, self.b, self.c = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.randn(8))
        self.alone = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.ln(torch.relu(self.a(x))) * self.scale
        h = self.b(h) * y[:, :1]
        return self.c(h), h.sum(0), self.alone * 3


def _inputs(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, generator=gen).requires_grad_() for _ in range(2)]


def _grads(outs: tuple[torch.Tensor, ...], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen) for o in outs]


def test_two_passes_equal_one_backward_and_accumulate():
    torch.manual_seed(0)
    model = Stage()
    ref = copy.deepcopy(model)
    fired: list[str] = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, name=name: fired.append(name))
    for step in range(2):  # the second micro-batch accumulates onto the first's gradients
        xs, want_xs = _inputs(step), _inputs(step)
        outs = model(*xs)
        split = plan(list(outs), _grads(outs, step), xs)
        assert split is not None and len(split.boundaries) >= 4 and len(split.outside) == 1
        dx = split.inputs_first()
        if step == 0:
            assert all(p.grad is None for p in model.parameters())  # nothing of the weights yet
            assert fired == []
        split.weights()
        want = ref(*want_xs)
        torch.autograd.backward(list(want), _grads(want, step))
        for got, x in zip(dx, want_xs):
            torch.testing.assert_close(got, x.grad)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert sorted(fired) == sorted(2 * [n for n, _ in model.named_parameters()])


def test_a_transformer_block_splits_and_matches():
    torch.manual_seed(0)
    block = Block(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16))
    ref = copy.deepcopy(block)
    x = torch.randn(2, 8, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = block(x)
    dy = torch.randn_like(out)
    split = plan([out], [dy], [x])
    assert split is not None
    (dx,) = split.inputs_first()
    split.weights()
    ref(x_ref).backward(dy)
    torch.testing.assert_close(dx, x_ref.grad)
    for (name, p), q in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_non_reentrant_checkpoint_with_dropout_splits_and_matches():
    """Its recomputation (same dropout mask, RNG state restored) serves both passes."""
    torch.manual_seed(0)
    inner, outer = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5)), nn.Linear(8, 3)
    ref_inner, ref_outer = copy.deepcopy(inner), copy.deepcopy(outer)
    x = torch.randn(4, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    torch.manual_seed(5)
    out = outer(checkpoint(inner, x, use_reentrant=False))
    dy = torch.randn_like(out)
    split = plan([out], [dy], [x])
    assert split is not None
    (dx,) = split.inputs_first()
    split.weights()
    torch.manual_seed(5)
    ref_outer(ref_inner(x_ref)).backward(dy)
    torch.testing.assert_close(dx, x_ref.grad)
    got = [*inner.parameters(), *outer.parameters()]
    for p, q in zip(got, [*ref_inner.parameters(), *ref_outer.parameters()]):
        torch.testing.assert_close(p.grad, q.grad)


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):  # type: ignore[no-untyped-def,override]
        ctx.save_for_backward(x, w)
        return x * w * 2

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def,override]
        x, w = ctx.saved_tensors
        return g * w * 2, (g * x * 2).sum(0)


def test_custom_ops_split_and_match():
    """A torch.library op splits: on the input side (its gradient flows to the input only) and at a
    boundary (with a weight edge), each runs its backward once, and the gradients match one backward."""
    torch.manual_seed(0)
    first, second = nn.Linear(8, 8), nn.Linear(8, 3)
    gain, shift = nn.Parameter(torch.randn(8)), torch.randn(8)  # a weight edge, and a constant operand
    ref = copy.deepcopy([first, second, gain])
    x = torch.randn(4, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    fired: list[int] = []
    params = [*first.parameters(), gain, *second.parameters()]
    for k, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda _p, k=k: fired.append(k))
    out = second(scaled(torch.relu(scaled(first(x), shift)), gain))
    dy = torch.randn_like(out)
    split = plan([out], [dy], [x])
    assert split is not None
    assert any("shardflow_test_scaled" in type(b).__name__ for b in split.boundaries)  # the gain's op
    before = BACKWARDS[0]
    (dx,) = split.inputs_first()
    assert gain.grad is None
    split.weights()
    assert BACKWARDS[0] - before == 2  # two ops, one backward each
    r_first, r_second, r_gain = ref
    r_second(scaled(torch.relu(scaled(r_first(x_ref), shift)), r_gain)).backward(dy)
    torch.testing.assert_close(dx, x_ref.grad)
    for p, q in zip(params, [*r_first.parameters(), r_gain, *r_second.parameters()]):
        torch.testing.assert_close(p.grad, q.grad)
    assert sorted(fired) == list(range(len(params)))


def test_no_split_where_something_would_run_or_count_twice():
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    # one parameter reached from two boundaries: the second pass would add its gradient twice
    shared = nn.Parameter(torch.randn(4))
    out = lin(x * shared) * shared
    assert plan([out], [torch.ones_like(out)], [x]) is None
    # a custom Function with a weight edge would run its backward in both passes
    w = nn.Parameter(torch.randn(4))
    out = _Double.apply(lin(x), w)
    assert plan([out], [torch.ones_like(out)], [x]) is None
    # a reentrant checkpoint runs its own backward, which refuses autograd.grad
    out = checkpoint(lin, x, use_reentrant=True)
    assert plan([out], [torch.ones_like(out)], [x]) is None
    # nothing to gain: no input, or no root reaching one
    out = lin(x)
    assert plan([out], [torch.ones_like(out)], []) is None
    assert plan([w * 2], [torch.ones(4)], [x]) is None


def test_held_between_passes_is_the_gradient_the_weight_pass_reads():
    """Linear(8, 16), ReLU, Linear(16, 4) on 5 rows: the input pass makes the gradient entering the first
    Linear (5 x 16 floats), which its weight pass reads; the second Linear's arrives as the stage's gradient
    input (held in any case); activations are the forward's."""
    stage = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    joint = trace_stage(stage, [torch.randn(5, 8)], [True]).joint
    assert held_between_passes(joint) == 5 * 16 * 4
    # a layer norm's backward makes its input's and its weights' gradients in one op: the gradient entering
    # it counts too (and not the mean and rstd its forward saved), each storage once
    stage = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8))
    joint = trace_stage(stage, [torch.randn(5, 8)], [True]).joint
    assert held_between_passes(joint) == 2 * 5 * 8 * 4
