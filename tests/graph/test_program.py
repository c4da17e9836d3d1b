"""The static per-rank program: what it communicates, where, and that new input shapes get a new program.

Communication is read from the program itself (``Program.collectives``, one entry per boxing or bucket in
the generated code, tagged forward / backward / after) and checked against what the strategy promises."""

from __future__ import annotations

import copy

import torch

import shardflow as sf
from shardflow.models import GPT, MLP, GPTConfig, MLPConfig
from shardflow.testing import run_on_ranks


def _dp_gpt() -> list[tuple[str, str, str]]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16))
    x = torch.randint(0, 32, (4, 8))
    pm = sf.compile(model, sf.Mesh("cpu", (2,), names=("dp",)), example_inputs=(x, x), strategy="dp")
    pm.bucket_bytes = 2048  # several buckets, so that some leave during backward
    program = pm.program(pm._inputs((x, x)))
    return [(c.phase, c.where, c.route) for c in program.collectives]


def test_data_parallel_communicates_only_gradients_and_the_loss():
    for comms in run_on_ranks(2, _dp_gpt):
        inside = [c for c in comms if c[0] in ("forward", "backward") and not c[1].startswith("gradient bucket")]
        assert inside == [], inside  # batch-split activations never move
        buckets = [c for c in comms if c[1].startswith("gradient bucket")]
        assert all(route == "all_reduce" for _, _, route in buckets)
        assert any(phase == "backward" for phase, _, _ in buckets), "no bucket left before backward ended"
        assert [c[1] for c in comms if c[0] == "after" and not c[1].startswith("gradient bucket")] == ["loss"]


def _tp_mlp() -> list[tuple[str, str, str]]:
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=6, hidden_sizes=(16, 12), num_classes=5))
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    pm = sf.compile(model, sf.Mesh("cpu", (2,), names=("tp",)), example_inputs=(x, y), strategy="tp")
    assert pm.layouts["net.0.weight"] == (sf.S(0),) and pm.layouts["net.2.weight"] == (sf.S(1),)
    program = pm.program(pm._inputs((x, y)))
    return [(c.phase, c.where, c.route) for c in program.collectives]


def test_megatron_pair_reduces_once_in_forward():
    for comms in run_on_ranks(2, _tp_mlp):
        forward = [c for c in comms if c[0] == "forward"]
        # column-parallel, GELU, row-parallel: one reduction of the row-parallel partial sums, no gathers
        assert len(forward) == 1, forward
        assert forward[0][2] in ("all_reduce", "reduce_scatter"), forward


def _tp_gpt() -> tuple[dict[str, object], list[tuple[str, str, str]]]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=128))
    x = torch.randint(0, 256, (4, 32))
    mesh = sf.Mesh("cpu", (2,), names=("tp",))
    pm = sf.compile(model, mesh, example_inputs=(x, x), strategy="tp")  # no hints: attention too
    program = pm.program(pm._inputs((x, x)))
    return dict(pm.layouts), [(c.phase, c.where, c.route) for c in program.collectives]


def test_megatron_gpt_blocks_reduce_once_per_pair():
    for layouts, comms in run_on_ranks(2, _tp_gpt):
        # the fused q/k/v projection is split by head within each block, its partner by rows; the MLP likewise
        assert layouts["transformer.h.0.attn.c_attn.weight"] == (sf.Blocked(0, 3),)
        assert layouts["transformer.h.0.attn.c_proj.weight"] == (sf.S(1),)
        assert layouts["transformer.h.0.mlp.c_fc.weight"] == (sf.S(0),)
        forward = [c for c in comms if c[0] == "forward"]
        backward = [c for c in comms if c[0] == "backward"]
        # Megatron's count: per block, attention's and the MLP's partial sums reduced once each in forward
        assert [c[2] for c in forward] == ["all_reduce"] * 4, forward
        # backward: the residual gradient is reduced once before each block's row-parallel linears but the
        # top one (its gradient arrives whole); the last partial sum rides in the gradient bucket
        assert [c[2] for c in backward] == ["all_reduce"] * 3, backward
        assert [c[2] for c in comms if c[0] == "after"] == ["all_reduce"], comms


def _new_shapes() -> list[tuple[float, float]]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-6, foreach=False)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 32, (b, t), generator=gen) for b, t in [(4, 8), (3, 8), (4, 5), (4, 8)]]
    pm = sf.compile(
        model,
        sf.Mesh("cpu", (2,), names=("dp",)),
        example_inputs=(batches[0], batches[0]),
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, foreach=False),
    )
    out = []
    for x in batches:
        want = ref(x, x)
        opt.zero_grad()
        want.backward()
        opt.step()
        out.append((pm.step(x, x), want.item()))
    assert len(pm.programs) == 3, "one program per input signature, reused when a signature comes back"
    return out


def test_new_input_shapes_get_their_own_program():
    for pairs in run_on_ranks(2, _new_shapes):
        for got, want in pairs:
            assert abs(got - want) <= 1e-5 + 1e-4 * abs(want), pairs
