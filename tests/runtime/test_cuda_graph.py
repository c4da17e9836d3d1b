"""The parts of CUDA-graph replay that need no GPU: the capture-safe embedding backward against ATen's, the
dispatch mode that swaps it in, optimizers made capturable, the fingerprint that decides recapture, and the
refusals. Capture and replay themselves are tested on a GPU (tests/graph/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

import shardflow as sf
from shardflow.graph.compile import check_graphable
from shardflow.models import MLP, MLPConfig
from shardflow.runtime import cuda_graph
from shardflow.runtime.cuda_graph import capture_safe, embedding_backward, fingerprint, make_capturable

aten = torch.ops.aten


@pytest.mark.parametrize("padding_idx", [-1, 3])
@pytest.mark.parametrize("by_freq", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_embedding_backward_equals_aten(padding_idx, by_freq, dtype):
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 11, (5, 7), generator=gen)  # repeats: rows are sums
    idx[0, :3] = 3  # the padding row occurs
    grad = torch.randn(5, 7, 6, generator=gen).to(dtype)
    want = aten.embedding_dense_backward.default(grad, idx, 13, padding_idx, by_freq)
    got = embedding_backward(grad, idx, 13, padding_idx, by_freq)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if padding_idx >= 0:
        assert not got[padding_idx].any()
    assert not got[11:].any()  # indices never seen get no gradient


def test_capture_safe_routes_embedding_backward(monkeypatch):
    calls = []

    def counted(*args):  # type: ignore[no-untyped-def]
        calls.append(args[2])
        return embedding_backward(*args)

    monkeypatch.setitem(cuda_graph._REPLACED, aten.embedding_dense_backward.default, counted)
    emb = torch.nn.Embedding(9, 4)
    idx = torch.tensor([[1, 2, 2, 8]])
    emb(idx).square().sum().backward()
    want = emb.weight.grad.clone()
    emb.weight.grad = None
    with capture_safe():
        emb(idx).square().sum().backward()
    assert calls == [9]
    torch.testing.assert_close(emb.weight.grad, want)


def test_make_capturable():
    w = torch.nn.Parameter(torch.randn(3))
    adam = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones(3)
    adam.step()  # state exists before the flag is set
    assert adam.param_groups[0]["capturable"] is False
    assert make_capturable(adam) is True
    assert all(g["capturable"] for g in adam.param_groups)  # (a host step count moving: test_gpu.py)
    assert make_capturable(torch.optim.SGD([w], lr=0.1, momentum=0.9)) is True  # no step counts to move
    assert make_capturable(torch.optim.LBFGS([w])) is False  # its step reads the loss back: runs after replay


def test_fingerprint_sees_what_the_graph_bakes_in():
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    base = fingerprint([w, 7], opt)
    with torch.no_grad():
        w.mul_(2)  # in place: the graph reads the new values at the same address
    assert fingerprint([w, 7], opt) == base
    opt.param_groups[0]["lr"] = 0.05  # a float lr is baked into the captured update
    assert fingerprint([w, 7], opt) != base
    opt.param_groups[0]["lr"] = 0.1
    assert fingerprint([torch.randn(3), 7], opt) != base  # a replaced tensor: a new address
    lr = torch.tensor(0.1)
    opt.param_groups[0]["lr"] = lr
    tensor_lr = fingerprint([w, 7], opt)
    lr.fill_(0.01)  # a tensor lr is read from memory: changing it in place needs no new capture
    assert fingerprint([w, 7], opt) == tensor_lr
    w.grad = torch.ones(3)
    opt.param_groups[0]["lr"] = 0.1
    opt.step()  # optimizer state appears
    assert fingerprint([w, 7], opt) != base


def test_cuda_graphs_refused_off_one_gpu():
    model = MLP(MLPConfig(in_features=4, hidden_sizes=(8,), num_classes=3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for mesh in [sf.Mesh("cpu", (1,)), sf.Mesh("cuda", (2,))]:
        with pytest.raises(ValueError, match=r"not a one-device CUDA mesh: compile for sf.Mesh\('cuda', \(1,\)\)"):
            sf.compile(model, mesh, example_inputs=(x, y), cuda_graphs=True)
    with pytest.raises(NotImplementedError, match="cuda_graphs cannot be combined with pipeline="):
        sf.compile(
            model, sf.Mesh("cpu", (2,)), example_inputs=(x, y), cuda_graphs=True, pipeline=sf.Pipeline(axis="d0")
        )
    with pytest.raises(ValueError, match="zero=1: one device has nothing to shard"):
        check_graphable(sf.Mesh("cuda", (1,)), 1)
    check_graphable(sf.Mesh("cuda", (1,)), 0)  # a one-GPU mesh is fine
    pm = sf.compile(model, sf.Mesh("cpu", (1,)), example_inputs=(x, y))
    with pytest.raises(ValueError, match="Mesh\\('cpu'"):
        pm.cuda_graphs = True  # set after compiling: re-planning refuses, naming the mesh
    assert pm.cuda_graphs is False and pm.step(x, y) > 0  # the refused change left the plan as it was
    with pytest.raises(ValueError, match="cuda_graphs replay the static program"):
        pm.plan.replace(cuda_graphs=True, static=False)


def test_a_snapshot_from_a_graphed_module_loads_anywhere(tmp_path):
    """A module stepped under CUDA graphs saves ``capturable=True`` in its optimizer's groups; loading that
    snapshot keeps the loading module's own setting (here a CPU mesh, where capturable updates cannot run)."""
    model = MLP(MLPConfig(in_features=4, hidden_sizes=(8,), num_classes=3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    saved = sf.compile(model, sf.Mesh("cpu", (1,)), example_inputs=(x, y))
    saved.step(x, y)
    for group in saved.optimizer.param_groups:
        group["capturable"] = True  # as make_capturable left it on a GPU
    saved.save(str(tmp_path / "snap"))
    loaded = sf.compile(model, sf.Mesh("cpu", (1,)), example_inputs=(x, y))
    loaded.load(str(tmp_path / "snap"))
    assert not any(g["capturable"] for g in loaded.optimizer.param_groups)
    twin = sf.compile(model, sf.Mesh("cpu", (1,)), example_inputs=(x, y))  # the saved module's run, not graphed
    twin.step(x, y)
    assert loaded.step(x, y) == pytest.approx(twin.step(x, y), rel=1e-6)  # steps, from the state saved
