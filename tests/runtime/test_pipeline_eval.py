"""``PipelineModule.evaluate`` on real ranks equals plain PyTorch's ``model.eval(); model(x, y)`` under ``no_grad``
on every rank of the mesh, after training steps moved the parameters: GPipe and 1F1B over pp x dp stages, the
MLP (its reference trained alone, rtol 1e-4 as the training tests) and the GPT with dropout (so eval mode
matters: the stages are torch.export graphs with dropout baked in; its reference loads the pipeline's trained
parameters, rtol 1e-5), batches that micro-batches cut unevenly, tensor-parallel stages (pp x tp: a program of
their own in eval mode) and a mesh smaller than the world (None outside it). Evaluating changes nothing: 2
steps, evaluate, 1 step give bit-exactly the losses and state of 3 steps, the RNG state, gradients and
training mode as they were. A method other than forward and a batch of another shape are refused with the fix."""

from __future__ import annotations

import copy

import pytest
import torch

import shardflow as sf
from shardflow.models import GPT, MLP, GPTConfig, MLPConfig
from shardflow.runtime.tensor_stage import local
from shardflow.testing import run_on_ranks
from tests.graph.test_compile import reference_step

# (mesh shape, axis names, schedule, micro-batches, batch rows, model, strategy, training steps first);
# batches of 10 rows in 3 micro-batches are 4, 3 and 3 rows, cut 2+2 and 2+1 over two data-parallel ranks
CASES = [
    ((2, 2), ("pp", "dp"), "gpipe", 3, 10, "gpt", "dp", 2),
    ((2, 2), ("pp", "dp"), "1f1b", 3, 10, "mlp", "dp", 2),
    # a tensor-parallel stage cannot train with dropout (no layout rule for its random mask): the GPT evaluated
    # at once shows it runs a program of its own, traced in eval mode; the MLP, trained, that it sees the updates
    ((2, 2), ("pp", "tp"), "1f1b", 2, 7, "gpt", "tp", 0),
    ((2, 2), ("pp", "tp"), "gpipe", 3, 7, "mlp", "tp", 2),
    ((2,), ("pp",), "gpipe", 3, 7, "mlp", "dp", 2),  # ranks 2 and 3 are outside the mesh
]


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":  # dropout on: a forward in training mode would not match the eval reference
        return GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.1))
    return MLP(MLPConfig(in_features=6, hidden_sizes=(16, 16, 16), num_classes=5))


def _batches(kind: str, rows: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    if kind == "gpt":
        xs = [torch.randint(0, 32, (rows, 8), generator=gen) for _ in range(n)]
        return [(x, torch.roll(x, -1, 1)) for x in xs]
    return [(torch.randn(rows, 6, generator=gen), torch.randint(0, 5, (rows,), generator=gen)) for _ in range(n)]


def _adamw(ps):  # type: ignore[no-untyped-def]
    return torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, foreach=False)


def _compile(model: torch.nn.Module, shape, names, schedule: str, m: int, example, strategy: str):  # type: ignore[no-untyped-def]
    mesh = sf.Mesh("cpu", shape, names=names)
    pipeline = sf.Pipeline(micro_batches=m, schedule=schedule)
    return sf.compile(
        model, mesh, example_inputs=example, optimizer=_adamw, max_grad_norm=0.5, pipeline=pipeline, strategy=strategy
    )


def _equals_plain(shape, names, schedule: str, m: int, rows: int, kind: str, strategy: str, steps: int) -> str:  # type: ignore[no-untyped-def]
    """Training steps, then evaluate on another batch against the plain model in eval mode."""
    case = f"{kind} {shape} {names} {schedule} m={m} rows={rows} {strategy} steps={steps}"
    model = _model(kind)
    ref = copy.deepcopy(model)
    opt = _adamw(ref.parameters())
    data = _batches(kind, rows, steps + 1)
    pm = _compile(model, shape, names, schedule, m, data[0], strategy)
    for x, y in data[:steps]:
        reference_step(ref, opt, x, y)
        pm.step(x, y)
    if kind == "gpt":  # dropout draws other masks in the pipeline's steps: evaluate the parameters it reached
        ref.load_state_dict(pm.full_state_dict())
    got = pm.evaluate(*data[-1])
    if not pm.inside:
        assert got is None, case
        return case
    ref.eval()
    with torch.no_grad():
        want = ref(*data[-1])
    # a reference trained alone drifts within the training tests' rtol (micro-batches sum in another order)
    rtol = 1e-4 if steps and kind != "gpt" else 1e-5
    assert isinstance(got, torch.Tensor) and got.dim() == 0 and not got.requires_grad, (case, got)
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6, msg=case)
    assert all(module.training for module in pm.modules.values()), case
    return case


def _changes_nothing() -> str:
    """2 steps, evaluate, 1 step against 3 steps of a twin pipeline, bit-exactly (dropout draws from the RNG)."""
    data = _batches("gpt", 10, 3)
    ref = _model("gpt")  # built now: it seeds the RNG; it checks the 1F1B loss against plain PyTorch in eval mode
    runs = []
    for evaluate in (True, False):
        pm = _compile(_model("gpt"), (2, 2), ("pp", "dp"), "1f1b", 3, data[0], "dp")
        torch.manual_seed(1234)
        losses = [pm.step(*data[0]), pm.step(*data[1])]
        if evaluate:
            rng = torch.get_rng_state()
            grads = [None if p.grad is None else local(p.grad).clone() for p in pm.params]
            got = pm.evaluate(*data[2])
            assert torch.equal(rng, torch.get_rng_state())
            after = [None if p.grad is None else local(p.grad) for p in pm.params]
            assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(grads, after))
            assert all(module.training for module in pm.modules.values())
            ref.load_state_dict(pm.full_state_dict())
            with torch.no_grad():
                torch.testing.assert_close(got, ref.eval()(*data[2]), rtol=1e-5, atol=1e-6)
        losses.append(pm.step(*data[2]))
        runs.append((losses, pm.full_state_dict()))
    (with_eval, state), (without, plain_state) = runs
    assert with_eval == without, (with_eval, without)
    assert state.keys() == plain_state.keys()
    assert all(torch.equal(state[k], plain_state[k]) for k in state), [
        k for k in state if not torch.equal(state[k], plain_state[k])
    ]
    with pytest.raises(ValueError, match="cut into stages along its forward, so it evaluates the forward"):
        pm.evaluate(*data[2], method="predict")
    with pytest.raises(ValueError, match=r"pipeline inputs of shapes \[\(9, 8\), \(9, 8\)\], but the stages were"):
        pm.evaluate(*_batches("gpt", 9, 1)[0])
    return "changes nothing"


def _checks() -> list[str]:
    return [*(_equals_plain(*case) for case in CASES), _changes_nothing()]


def test_evaluate_equals_plain_eval_and_changes_nothing():
    checked = run_on_ranks(4, _checks, timeout=240)
    assert all(len(done) == len(CASES) + 1 for done in checked), checked
