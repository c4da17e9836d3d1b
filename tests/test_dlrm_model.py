"""DLRM and the synthetic Criteo log: shapes, determinism, Zipf ids, a learnable teacher, and a dense part that
traces to ops with layout rules."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import shardflow.ops.rules  # noqa: F401  (registers the layout rules)
from shardflow.models import DLRM, CriteoShape, DLRMConfig, criteo_batch, dlrm, dlrm_inputs
from shardflow.models.criteo import CRITEO_1TB_ROWS, MLPERF_MULTI_HOT, CriteoBatch
from shardflow.models.dlrm import bce_with_logits, interact
from shardflow.ops.registry import RULES
from shardflow.train.metrics import auc

TINY = 1e-4  # tables of 2 to 4000 rows


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _assert_same(a: CriteoBatch, b: CriteoBatch) -> None:
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("multi_hot", [True, False], ids=["multi-hot", "one-hot"])
def test_forward_backward_and_predict(multi_hot: bool) -> None:
    shape = CriteoShape(scale=TINY, multi_hot=multi_hot)
    batch = criteo_batch(shape, 64, 0)
    torch.manual_seed(0)
    model = DLRM(DLRMConfig(table_rows=shape.table_rows))
    assert [n for n, _ in model.named_children()] == ["bottom", "tables", "top"]
    assert "tables.25.weight" in dict(model.named_parameters())
    loss = model(*dlrm_inputs(batch))
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    p = model.predict(*dlrm_inputs(batch)[:-1])
    assert p.shape == (64,) and bool(((p > 0) & (p < 1)).all())
    with pytest.raises(ValueError, match="expected 53"):
        model(*dlrm_inputs(batch)[:-2])


def test_batch_layout_and_determinism() -> None:
    shape = CriteoShape(scale=TINY)
    state = torch.get_rng_state()
    a, again, other = criteo_batch(shape, 32, 5), criteo_batch(shape, 32, 5), criteo_batch(shape, 32, 6)
    assert torch.equal(torch.get_rng_state(), state)  # no draw from the global RNG
    _assert_same(a, again)
    assert not torch.equal(a.dense, other.dense) and not torch.equal(a.ids[20], other.ids[20])
    assert a.dense.shape == (32, 13) and a.dense.dtype == torch.float32 and bool((a.dense >= 0).all())
    assert a.labels.shape == (32,) and set(a.labels.tolist()) <= {0.0, 1.0}
    for ids, offsets, rows, bag in zip(a.ids, a.offsets, shape.table_rows, MLPERF_MULTI_HOT):
        assert ids.dtype == offsets.dtype == torch.int64 and ids.numel() == 32 * bag
        assert torch.equal(offsets, torch.arange(32) * bag)
        assert 0 <= int(ids.min()) and int(ids.max()) < rows
    one_hot = criteo_batch(CriteoShape(scale=TINY, multi_hot=False), 32, 5)
    assert all(ids.numel() == 32 for ids in one_hot.ids)


def test_table_rows_scale_from_mlperf() -> None:
    assert CriteoShape().table_rows == CRITEO_1TB_ROWS and len(CRITEO_1TB_ROWS) == 26
    assert sum(MLPERF_MULTI_HOT) == 214
    rows = CriteoShape(scale=TINY).table_rows
    assert rows[:6] == (4000, 4, 2, 2, 3, 2)  # ceil(c * 1e-4), at least min_rows=2
    assert CriteoShape(scale=TINY, min_rows=10).table_rows[5] == 10
    with pytest.raises(ValueError, match="scale must be a positive number"):
        CriteoShape(scale=0)


def test_full_scale_batch_is_in_range() -> None:
    """MLPerf's full cardinalities (40M-row tables): ids drawn without a table-sized array, all in range."""
    shape = CriteoShape(scale=1.0)
    batch = criteo_batch(shape, 4096, 1)
    assert all(0 <= int(ids.min()) and int(ids.max()) < rows for ids, rows in zip(batch.ids, shape.table_rows))


def test_zipf_ids_repeat_far_more_than_uniform_ones() -> None:
    zipf = criteo_batch(CriteoShape(scale=1e-2), 2048, 0)
    uniform = criteo_batch(CriteoShape(scale=1e-2, alpha=None), 2048, 0)
    for t in (0, 10, 20):  # 400k, 30k and 400k rows
        assert zipf.ids[t].unique().numel() < 0.5 * uniform.ids[t].unique().numel()
    assert int(zipf.ids[0].bincount().argmax()) != 0  # the hottest id is not row 0


def test_interaction_is_the_strict_lower_triangle() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=gen)
    pooled = [torch.randn(5, 4, generator=gen) for _ in range(3)]
    z = torch.stack([x, *pooled], dim=1)
    rows, cols = torch.tril_indices(4, 4, offset=-1)
    expected = torch.cat([x, (z @ z.transpose(1, 2))[:, rows, cols]], dim=1)
    torch.testing.assert_close(interact(x, pooled), expected)


def test_bce_matches_torch_for_extreme_logits() -> None:
    logits = torch.tensor([-200.0, -30.0, -1.0, 0.0, 0.5, 30.0, 200.0], requires_grad=True)
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    ours = bce_with_logits(logits, labels)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = F.binary_cross_entropy_with_logits(logits, labels)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-7)


def test_dense_part_traces_to_ops_with_layout_rules() -> None:
    model = DLRM(DLRMConfig(table_rows=(10, 20, 30), dim=4, bottom=(8, 4), top=(8,)))
    params = list(model.bottom.parameters()) + list(model.top.parameters())

    def step(dense: torch.Tensor, pooled: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled = [p.detach().requires_grad_(True) for p in pooled]
        loss = bce_with_logits(model.top(interact(model.bottom(dense), pooled)).squeeze(1), labels)
        return (loss, *torch.autograd.grad(loss, [*params, *pooled]))

    graph = make_fx(step)(torch.rand(6, 13), [torch.randn(6, 4) for _ in range(3)], torch.ones(6))
    ops = {n.target for n in graph.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.bmm.default in ops and torch.ops.aten.select.int in ops
    assert sorted(str(op) for op in ops if op not in RULES) == []


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_sparse_adagrad_learns_the_teacher() -> None:
    shape = CriteoShape(scale=TINY, multi_hot=False)
    held_out = criteo_batch(shape, 4096, 10**6)
    torch.manual_seed(0)
    model = DLRM(DLRMConfig(table_rows=shape.table_rows, sparse=True))
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
    for i in range(200):
        loss = model(*dlrm_inputs(criteo_batch(shape, 128, i)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.tables[0].weight.grad is not None and model.tables[0].weight.grad.is_sparse
    with torch.no_grad():
        score = auc(model.predict(*dlrm_inputs(held_out)[:-1]), held_out.labels)
    assert score > 0.6  # 0.74 here; the teacher itself scores about 0.81


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"bottom \(64, 8\) must end in dim=16"):
        DLRMConfig(table_rows=(5,), bottom=(64, 8))
    with pytest.raises(ValueError, match="table_rows is empty"):
        DLRMConfig(table_rows=())


def test_model_code_imports_only_torch() -> None:
    """Like the other reference models, DLRM is plain PyTorch: nothing from shardflow inside it."""
    tree = ast.parse(Path(dlrm.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert roots <= {"__future__", "collections", "dataclasses", "typing", "torch"}, roots
