"""Ops that gather or scatter rows with some arithmetic: embedding bags, scatter-adds, pooling."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from shardflow.ops.flops.registry import ADD, DIV, FORMULAS, Formula, OpFlops, arg, formula, numel


@formula("embedding_dense_backward")
def _embedding_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each looked-up row's gradient added into its row: an add per element of the gradient."""
    return OpFlops(vector=ADD * numel(args[0]))


@formula("scatter_add", "index_add")
def _scatter_add(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """An add per element of the source (``scatter_add(x, dim, index, src)``, ``index_add(x, dim, index, src)``)."""
    return OpFlops(vector=ADD * numel(arg(args, kwargs, 3, "src", kwargs.get("source"))))


@formula("index_put")
def _index_put(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """A copy, or with ``accumulate`` an add per element of the values."""
    return OpFlops(vector=ADD * numel(args[2]) if arg(args, kwargs, 3, "accumulate", False) else 0)


@formula("_embedding_bag", "_embedding_bag_forward_only", "embedding_bag")
def _embedding_bag(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each looked-up row pooled into its bag: an add (sum, or max's compare) per element, a multiply more
    with per-sample weights; a mean divides each bag's result."""
    weight, ids = args[0], args[1]
    mode = arg(args, kwargs, 4, "mode", 0)
    weighted = arg(args, kwargs, 6, "per_sample_weights") is not None
    rows = numel(ids) * weight.shape[1]
    mean = DIV * numel(outs[0]) if mode == 1 and outs else 0
    return OpFlops(vector=(2 if weighted else 1) * ADD * rows + mean)


def _bag_backward(mode_at: int) -> Formula:
    """The embedding bag's backward whose ``mode`` argument is at ``mode_at``."""

    def count(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
        """Each bag's gradient added to the rows it read (an add per looked-up element; a mean divides it
        first); for a max, to the one row that won, per element of the bag's gradient."""
        grad, ids = args[0], args[1]
        mode = arg(args, kwargs, mode_at, "mode", 0)
        if mode == 2:
            return OpFlops(vector=ADD * numel(grad))
        return OpFlops(vector=(ADD + (DIV if mode == 1 else 0)) * numel(ids) * grad.shape[-1])

    return count


FORMULAS["_embedding_bag_backward"] = _bag_backward(8)
FORMULAS["_embedding_bag_dense_backward"] = _bag_backward(7)
FORMULAS["_embedding_bag_sparse_backward"] = _bag_backward(7)


@formula("_embedding_bag_per_sample_weights_backward")
def _bag_weights_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each looked-up row's weight gradient: the dot product of its bag's gradient with the row (a
    multiply-add per element)."""
    grad, ids = args[0], args[2]
    return OpFlops(vector=2 * ADD * numel(ids) * grad.shape[-1])


@formula("upsample_bilinear2d", "upsample_linear1d")
def _upsample_linear(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each result a weighted sum of its 2 (linear) or 4 (bilinear) neighbours: a multiply and an add each."""
    neighbours = {3: 2, 4: 4}.get(len(outs[0].shape), 4)
    return OpFlops(vector=2 * ADD * neighbours * numel(outs[0]))


@formula("upsample_bilinear2d_backward", "upsample_linear1d_backward")
def _upsample_linear_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each result's gradient spread over its neighbours: a multiply and an add each."""
    neighbours = {3: 2, 4: 4}.get(len(args[0].shape), 4)
    return OpFlops(vector=2 * ADD * neighbours * numel(args[0]))


@formula("upsample_nearest1d_backward", "upsample_nearest2d_backward", "upsample_nearest3d_backward")
def _upsample_nearest_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each result's gradient added to the element it copied."""
    return OpFlops(vector=ADD * numel(args[0]))


@formula("scatter_reduce")
def _scatter_reduce(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``scatter_reduce(x, dim, index, src, reduce)``: an add or compare per element of the source (a mean:
    and a divide per result)."""
    mean = DIV * numel(outs[0]) if arg(args, kwargs, 4, "reduce") == "mean" else 0
    return OpFlops(vector=ADD * numel(args[3]) + mean)


@formula("max_pool2d_with_indices", "max_pool3d_with_indices", "max_pool1d", "max_pool2d")
def _max_pool(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """A compare per window element of each result."""
    return OpFlops(vector=ADD * numel(outs[0]) * math.prod(args[1]))


@formula("max_pool2d_with_indices_backward", "max_pool3d_with_indices_backward")
def _max_pool_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each result's gradient added at its maximum's place."""
    return OpFlops(vector=ADD * numel(args[0]))


@formula("avg_pool2d", "avg_pool3d")
def _avg_pool(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """An add per window element of each result, then a divide."""
    return OpFlops(vector=(ADD * math.prod(args[1]) + DIV) * numel(outs[0]))


@formula("avg_pool2d_backward", "avg_pool3d_backward")
def _avg_pool_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each result's gradient divided, then added to every element of its window."""
    return OpFlops(vector=(DIV + ADD * math.prod(args[2])) * numel(args[0]))


@formula("_adaptive_avg_pool2d", "_adaptive_avg_pool3d")
def _adaptive_avg_pool(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Every input element added into its window (windows tile the input), a divide per result."""
    return OpFlops(vector=ADD * numel(args[0]) + DIV * numel(outs[0]))


@formula("_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward")
def _adaptive_avg_pool_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each result's gradient divided and spread over its window."""
    return OpFlops(vector=DIV * numel(args[0]) + ADD * numel(args[1]))
