"""``sf.compile(..., embeddings=sf.Embeddings(...))`` and ``sf.plan(..., embeddings=...)``: the tables found
and traced, placed (``planner.py``, or as a given plan says), the dense model planned as any model, and
the two compiled into a ``SparseParallelModule``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shardflow.embedding.dense import add_method, dense_model
from shardflow.embedding.exchange import split_samples
from shardflow.embedding.lookups import Lookups, TableModule, find_tables, trace_lookups
from shardflow.embedding.module import SparseParallelModule
from shardflow.embedding.planner import check_fits, place_tables
from shardflow.embedding.spec import Embeddings
from shardflow.embedding.table import bounds
from shardflow.embedding.validate import check_arguments
from shardflow.graph.compile import SPARSE
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import S
from shardflow.plan import MeshSpec, ParallelPlan, PlanError, TablePlan
from shardflow.runtime.runner import OptimizerFactory, default_optimizer
from shardflow.tensor.global_tensor import GlobalTensor


@dataclass
class SparsePieces:
    """What planning found: the tables, the forward's lookups, the dense model and its example inputs."""

    tables: list[TableModule]
    lookups: Lookups
    dense: nn.Module
    dense_inputs: list[Any]
    unique: dict[str, float]


def sparse_pieces(
    model: nn.Module, mesh: Mesh | MeshSpec, example_inputs: Sequence[Any], spec: Embeddings
) -> SparsePieces:
    if not isinstance(spec, Embeddings):
        raise TypeError(f"embeddings= takes sf.Embeddings(...), got {type(spec).__name__}")
    if mesh.device_type != "cpu":
        raise NotImplementedError(
            f"sparse tables run on CPU meshes over gloo for now; {mesh} is a {mesh.device_type} mesh: use "
            'sf.Mesh("cpu", ...) (GPU lookups and a NCCL exchange are a later piece of work)'
        )
    if len(mesh.shape) != 1 or list(mesh.ranks) != sorted(mesh.ranks):
        raise NotImplementedError(
            f"sparse tables are split over a 1-d data-parallel mesh of increasing ranks for now; got {mesh}: "
            "use sf.Mesh(device, (n,))"
        )
    plain = [x.full() if isinstance(x, GlobalTensor) else x for x in example_inputs]
    tables = find_tables(model, spec)
    lookups = trace_lookups(model, "forward", tables, plain)
    args = lookups.arguments(plain)
    batch = check_arguments(lookups, args, {t.name: t for t in tables})
    dense = dense_model(model, [t.name for t in tables])
    add_method(dense, "forward", lookups)
    pooled = [torch.zeros((batch, *c.shape[1:])) for c in lookups.calls]
    dense_inputs = [x for i, x in enumerate(plain) if i not in lookups.sparse] + pooled
    unique = _unique_per_rank(lookups, args, batch, mesh.shape[0], tables)
    return SparsePieces(tables, lookups, dense, dense_inputs, unique)


def _unique_per_rank(
    lookups: Lookups, args: Sequence[torch.Tensor], batch: int, n: int, tables: Sequence[TableModule]
) -> dict[str, float]:
    """Distinct ids a rank looks up per table in the example batch (mean over ranks): the planner's traffic."""
    last = {t.name: t.include_last_offset for t in tables}
    counts: dict[str, float] = {}
    edges = bounds(batch, n)
    for r in range(n):
        per_table: dict[str, list[torch.Tensor]] = {}
        for c in lookups.calls:
            ids, off = args[c.ids], None if c.offsets is None else args[c.offsets]
            local, _, _ = split_samples(last[c.table], ids, off, None, edges[r], edges[r + 1])
            per_table.setdefault(c.table, []).append(local.reshape(-1))
        for name, xs in per_table.items():
            counts[name] = counts.get(name, 0.0) + len(torch.unique(torch.cat(xs))) / n
    return counts


def plan_sparse(
    model: nn.Module, mesh: Mesh | MeshSpec, example_inputs: Sequence[Any], spec: Embeddings, keywords: dict[str, Any]
) -> tuple[ParallelPlan, SparsePieces]:
    """The plan of the dense model (built as ``sf.plan`` builds any) with the tables placed in it."""
    from shardflow.graph.transforms import build_plan

    if keywords.get("pipeline") is not None:
        raise NotImplementedError("sparse tables with pipeline= are not supported yet: leave pipeline=None")
    if keywords.get("strategy", "dp") != "dp":
        raise NotImplementedError("sparse tables ride on data parallelism: use strategy='dp' with embeddings=")
    if keywords.get("input_sbp") is not None:
        raise NotImplementedError("input_sbp with embeddings=: the dense inputs are split by samples; leave it None")
    pieces = sparse_pieces(model, mesh, example_inputs, spec)
    n = mesh.shape[0]
    tables = place_tables(pieces.tables, spec, n, pieces.unique)
    check_fits(tables, pieces.tables, n)
    plan = build_plan(pieces.dense, mesh, pieces.dense_inputs, **keywords)
    return plan.replace(tables=tables), pieces


def _check_pooled_inputs(plan: ParallelPlan, pieces: SparsePieces) -> None:
    """The pooled vectors are fed split by samples: the plan must take them so."""
    first = len(pieces.dense_inputs) - len(pieces.lookups.calls)
    bad = [i for i in range(first, len(plan.inputs)) if plan.inputs[i] != (S(0),)]
    if bad:
        raise PlanError(f"inputs {bad} of the dense model are the tables' pooled vectors: their layout is (S(0),)")


def compile_sparse(
    model: nn.Module,
    mesh: Mesh | None,
    example_inputs: Sequence[Any],
    spec: Embeddings,
    optimizer: OptimizerFactory | None,
    keywords: dict[str, Any],
    plan: ParallelPlan | None = None,
) -> SparseParallelModule:
    """Compile ``model`` with the tables ``spec`` names sharded (see the module docstring)."""
    if plan is None:
        assert mesh is not None
        plan, pieces = plan_sparse(model, mesh, example_inputs, spec, keywords)
    else:
        mesh = mesh or plan.mesh.build()
        pieces = sparse_pieces(model, mesh, example_inputs, spec)
        missing = sorted({t.name for t in pieces.tables} ^ set(plan.tables))
        if missing:
            raise ValueError(
                f"the plan's tables and the model's differ in {missing}: plan tables with sf.plan(..., embeddings=)"
            )
        check_fits(plan.tables, pieces.tables, mesh.shape[0])
    _check_pooled_inputs(plan, pieces)
    if plan.execution.cuda_graphs or not plan.execution.static:
        raise NotImplementedError("sparse tables run around the static program: no cuda_graphs, static=True")
    assert isinstance(mesh, Mesh)
    pm = SparseParallelModule(
        model, pieces.dense, mesh, plan, optimizer or default_optimizer, spec, pieces.tables, pieces.lookups
    )
    pm.example_inputs = tuple(pieces.dense_inputs)
    pm.expected_unique = pieces.unique
    return pm


class _Hook:
    plan = staticmethod(plan_sparse)
    compile = staticmethod(compile_sparse)


SPARSE.append(_Hook)

__all__ = ["TablePlan", "compile_sparse", "plan_sparse"]
