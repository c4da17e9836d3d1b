"""The fused sparse optimizers: each updates only the rows a step touched, where they live, with its state
beside them, exactly as the torch optimizer of the same name updates ``nn.EmbeddingBag(sparse=True)``.

``rows`` are local row indices (unique, sorted), ``grad`` their summed gradient over the whole job. Torch's
sparse Adagrad and SparseAdam coalesce the gradient first; here it arrives coalesced.
"""

from __future__ import annotations

import torch

from shardflow.embedding.spec import SGD, Adagrad, Optimizer, RowWiseAdagrad, SparseAdam


def floats_per_row(opt: Optimizer, dim: int) -> int:
    """Floats a row of ``dim`` keeps with its optimizer state (the row itself included)."""
    if isinstance(opt, Adagrad):
        return 2 * dim
    if isinstance(opt, SparseAdam):
        return 3 * dim
    if isinstance(opt, RowWiseAdagrad):
        return dim + 1  # one accumulator per row
    return dim


def new_state(opt: Optimizer, weight: torch.Tensor, full_rows: bool) -> dict[str, torch.Tensor]:
    """Zeroed state for a local shard ``weight``; ``full_rows``: the row-wise accumulator covers every row
    of the table (a column shard holds all rows, but only some of each row's columns)."""
    if isinstance(opt, Adagrad):
        return {"sum": torch.zeros_like(weight)}
    if isinstance(opt, SparseAdam):
        return {"exp_avg": torch.zeros_like(weight), "exp_avg_sq": torch.zeros_like(weight)}
    if isinstance(opt, RowWiseAdagrad):
        return {"momentum": torch.zeros(weight.shape[0], dtype=weight.dtype)}
    return {}


def apply(
    opt: Optimizer,
    weight: torch.Tensor,
    state: dict[str, torch.Tensor],
    step: int,
    rows: torch.Tensor,
    grad: torch.Tensor,
    row_square_mean: torch.Tensor | None = None,
) -> None:
    """Update ``weight[rows]`` by ``grad`` (step ``step``, counted from 1). ``row_square_mean``: for the
    row-wise accumulator, the mean of each row's squared gradient over all its columns (a column shard's
    rows, its part summed with the other shards'); default: over this shard's columns, the whole row."""
    with torch.no_grad():
        if isinstance(opt, SGD):
            weight.index_add_(0, rows, grad, alpha=-opt.lr)
        elif isinstance(opt, Adagrad):
            s = state["sum"]
            s.index_add_(0, rows, grad * grad)
            std = s[rows].sqrt_().add_(opt.eps)
            weight.index_add_(0, rows, grad / std, alpha=-opt.lr)
        elif isinstance(opt, SparseAdam):
            b1, b2 = opt.betas
            m, v = state["exp_avg"], state["exp_avg_sq"]
            old_m, old_v = m[rows], v[rows]
            m_new = old_m + (grad - old_m) * (1 - b1)
            v_new = old_v + (grad * grad - old_v) * (1 - b2)
            m[rows], v[rows] = m_new, v_new
            step_size = opt.lr * (1 - b2**step) ** 0.5 / (1 - b1**step)
            weight.index_add_(0, rows, m_new / (v_new.sqrt() + opt.eps), alpha=-step_size)
        elif isinstance(opt, RowWiseAdagrad):
            mean = row_square_mean if row_square_mean is not None else (grad * grad).mean(dim=1)
            acc = state["momentum"]
            acc.index_add_(0, rows, mean)
            scale = opt.lr / (acc[rows].sqrt() + opt.eps)
            weight.index_add_(0, rows, grad * scale[:, None], alpha=-1.0)
        else:  # pragma: no cover - Embeddings checks the type
            raise TypeError(f"unknown embedding optimizer {opt!r}")
