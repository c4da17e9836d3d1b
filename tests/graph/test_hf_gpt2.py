"""A model nobody here wrote: Hugging Face GPT2LMHeadModel from a small config (no download), behind a
thin wrapper that returns the loss, compiled as dp, tp and hybrid, equals plain PyTorch."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers  # a dev dependency: `make test` installs it

import shardflow as sf
from shardflow.testing import run_on_ranks


class LossOf(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=x, labels=y).loss


def _run(strategy: str, shape: tuple[int, ...], names: tuple[str, ...]) -> None:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = LossOf(transformers.GPT2LMHeadModel(cfg))
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 40, (5, 8), generator=gen) for _ in range(3)]
    mesh = sf.Mesh("cpu", shape, names=names)
    make = lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, foreach=False)  # noqa: E731
    pm = sf.compile(
        model, mesh, example_inputs=(data[0], data[0]), strategy=strategy, optimizer=make, max_grad_norm=1.0
    )
    opt = make(ref.parameters())
    if strategy != "dp":
        # Conv1D weights are [in, out]; the fused q/k/v projection is split by head within each of its 3 blocks,
        # over 2 ranks; over 4, its 2 heads would be cut in two, so attention stays whole
        qkv = sf.Blocked(1, 3) if mesh.shape[-1] == 2 else sf.B
        assert pm.layouts["m.transformer.h.0.attn.c_attn.weight"][-1] == qkv
        assert pm.layouts["m.transformer.h.0.mlp.c_fc.weight"][-1] == sf.S(1)
    for x in data:
        loss = pm.step(x, x)
        want = ref(x, x)
        opt.zero_grad()
        want.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, foreach=False)
        opt.step()
        assert abs(loss - want.item()) <= 1e-5 + 1e-4 * abs(want.item()), (loss, want.item())
    got = pm.full_state_dict()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "strategy, shape, names",
    [("dp", (4,), ("dp",)), ("tp", (4,), ("tp",)), ("hybrid", (2, 2), ("dp", "tp"))],
)
def test_hf_gpt2_equals_plain_torch(strategy, shape, names):
    run_on_ranks(4, _run, strategy, shape, names, timeout=300)
