"""Property: the lowering's passes keep a program's results, whatever the program and the arena setting.

Random small DAGs of element-wise ops and matmuls over parameters, a buffer and an input (a tiny
``nn.Module``) are traced by ``trace_step`` and lowered by ``lower`` on a 1-rank mesh (a description: no
process group is needed) for ``arena`` False, True and ``"all"``; the program's loss and gradients, fast and
checked, must equal plain PyTorch autograd on the module. Arguments are passed as ``ParallelModule.program``
does: parameters, buffers, inputs, as local tensors.

The communication passes (buckets, ZeRO-2 reduce-scatters, ZeRO-3 gathers and their prefetch) need more
than one rank to run, so on a 2-rank description mesh the same DAGs are lowered for every rank and checked
for structure: the IR verifies after every pass (``ir/verify.py``: no use before its definition, so no
launch before its gradients; no stale storage), and every gradient is handed to the update exactly once.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import shardflow as sf
from shardflow.graph.lower import lower, trace_step
from shardflow.placement.sbp import B, S

N = 3
UNARY = ("tanh", "sigmoid", "neg", "sin", "relu", "square")
BINARY = ("add", "sub", "mul", "matmul")


class _Dag(nn.Module):
    """Values: ``x``, the buffer, the parameters, then one per op; the loss sums the mean of every value no
    op reads (the DAG's sinks)."""

    def __init__(self, n_params: int, ops: list[tuple[str, int, int]], seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.n_params = n_params
        for i in range(n_params):
            setattr(self, f"p{i}", nn.Parameter(0.5 * torch.randn(N, N, generator=g)))
        self.register_buffer("buf", 0.5 * torch.randn(N, N, generator=g))
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x, self.buf, *(getattr(self, f"p{i}") for i in range(self.n_params))]
        read: set[int] = set()
        for kind, i, j in self.ops:
            a, b = values[i], values[j]
            read.add(i)
            if kind in BINARY:
                read.add(j)
            if kind == "square":
                out = a * a
            elif kind in UNARY:
                out = getattr(torch, kind)(a)
            elif kind == "matmul":
                out = a @ b
            else:
                out = getattr(torch, kind)(a, b)
            values.append(out)
        first = 2 + self.n_params
        sinks = [v for k, v in enumerate(values) if k >= first and k not in read]
        return torch.stack([v.mean() for v in sinks]).sum()


@st.composite
def _dags(draw: st.DrawFn) -> tuple[int, list[tuple[str, int, int]], int]:
    n_params = draw(st.integers(1, 3))
    ops: list[tuple[str, int, int]] = []
    for n in range(draw(st.integers(1, 6))):
        size = 2 + n_params + n
        kind = draw(st.sampled_from(UNARY + BINARY))
        # the first op reads a parameter (so the loss has gradients); later ones mostly build on the last
        if n == 0:
            i = draw(st.integers(2, 1 + n_params))
        else:
            i = draw(st.integers(0, size - 1)) if draw(st.booleans()) else size - 1
        j = draw(st.integers(0, size - 1))
        ops.append((kind, i, j))
    return n_params, ops, draw(st.integers(0, 2**16))


def _sbp(placement: str) -> tuple:
    return ({"B": B, "S0": S(0), "S1": S(1)}[placement],)


def _check(model: _Dag, x: torch.Tensor, param_sbp: str, input_sbp: str) -> None:
    mesh = sf.Mesh("cpu", (1,), names=("dp",))
    params = list(model.parameters())
    buffers = list(model.buffers())
    loss_ref = model(x)
    used = [p for p in params if p.grad_fn is None]  # every parameter is a leaf
    grads_ref = torch.autograd.grad(loss_ref, used, allow_unused=True)
    joint = trace_step(model, (x,), "cpu")
    assert list(joint.grad_of) == [i for i, g in enumerate(grads_ref) if g is not None]
    sbps = [_sbp(param_sbp)] * len(params) + [(B,)] * len(buffers) + [_sbp(input_sbp)]
    args = [*(p.detach() for p in params), *buffers, x]
    for arena in (False, True, "all"):
        program = lower(joint, mesh, 0, sbps, arena=arena)
        for run in (program.checked, program.run):
            loss, grads = run(list(args))
            torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=1e-5)
            assert len(grads) == len(joint.grad_of)
            for k, p in enumerate(joint.grad_of):
                torch.testing.assert_close(grads[k], grads_ref[p], rtol=1e-5, atol=1e-5, msg=f"grad {k} ({arena=})")


@settings(max_examples=25, deadline=None)
@given(
    dag=_dags(),
    param_sbp=st.sampled_from(["B", "S0"]),
    input_sbp=st.sampled_from(["B", "S0", "S1"]),
)
def test_passes_keep_loss_and_gradients(
    dag: tuple[int, list[tuple[str, int, int]], int], param_sbp: str, input_sbp: str
) -> None:
    n_params, ops, seed = dag
    model = _Dag(n_params, ops, seed)
    x = torch.randn(N, N, generator=torch.Generator().manual_seed(seed + 1))
    _check(model, x, param_sbp, input_sbp)


def test_two_parameters_sharing_one_gradient_tensor() -> None:
    """x @ (a + b): autograd hands a and b one gradient tensor (one graph node); both are returned."""
    model = _Dag(2, [("add", 2, 3), ("matmul", 0, 4)], seed=0)
    _check(model, torch.randn(N, N), "B", "B")


@settings(max_examples=25, deadline=None)
@given(dag=_dags(), zero=st.sampled_from([0, 2, 3]))
def test_communication_passes_keep_the_ir_consistent(
    dag: tuple[int, list[tuple[str, int, int]], int], zero: int
) -> None:
    n_params, ops, seed = dag
    model = _Dag(n_params, ops, seed)
    x = torch.randn(N, N, generator=torch.Generator().manual_seed(seed + 1))
    mesh = sf.Mesh("cpu", (2,), names=("dp",))
    joint = trace_step(model, (x,), "cpu")
    params, buffers = list(model.parameters()), list(model.buffers())
    split, whole = (S(0),), (B,)
    sbps = [split if zero == 3 else whole] * len(params) + [whole] * len(buffers) + [split]
    grad_sbps = [split] * len(params) if zero == 2 else []
    for rank in (0, 1):
        program = lower(
            joint, mesh, rank, sbps, bucket_bytes=40, zero_axis=0 if zero == 3 else None, grad_sbps=grad_sbps
        )
        assert program.ir is not None and program.memory is not None and program.memory.peak > 0
        handed = sorted(k for unit in program.units for k in unit.grads)
        assert handed == list(range(len(joint.grad_of))), (handed, joint.grad_of)
