"""DLRM (Naumov et al. 2019): the reference recommendation model, dense MLPs around embedding-bag tables.

Tables are ``tables.0``, ``tables.1``, ... (one ``nn.EmbeddingBag`` each) so an embedding plan can name them;
the dense part (bottom MLP, dot interaction, top MLP, loss) uses only ATen ops with layout rules in
``shardflow/ops/rules`` (bmm, stack, select, slice, cat, mm, relu, exp, log, mean), so it traces and lowers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True, kw_only=True)
class DLRMConfig:
    """Widths of DLRM's bottom MLP, tables and top MLP."""

    dense_features: int = 13
    """Width of one dense input row (Criteo has 13); dense inputs are (batch, dense_features)."""
    table_rows: tuple[int, ...]
    """Rows of each embedding table, in feature order."""
    dim: int = 16
    """Width of every embedding row (and of the bottom MLP's output, which meets them in the interaction)."""
    bottom: tuple[int, ...] = (64, 16)
    """Widths of the bottom MLP's layers over the dense features (each Linear + ReLU); the last must be ``dim``."""
    top: tuple[int, ...] = (64, 32)
    """Widths of the top MLP's hidden layers (each Linear + ReLU); a final Linear to 1 logit follows."""
    mode: Literal["sum", "mean", "max"] = "sum"
    """How each table pools a sample's bag of rows."""
    sparse: bool = False
    """Tables give sparse gradients (for ``torch.optim.Adagrad`` / ``SparseAdam``); dense ones otherwise."""

    def __post_init__(self) -> None:
        for name in ("dense_features", "dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DLRMConfig.{name} must be a positive int, got {value!r}")
        for name in ("table_rows", "bottom", "top"):
            sizes = getattr(self, name)
            if not isinstance(sizes, tuple) or any(
                not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes
            ):
                raise ValueError(f"DLRMConfig.{name} must be a tuple of positive ints, got {sizes!r}")
        if not self.table_rows:
            raise ValueError("DLRMConfig.table_rows is empty: give the rows of at least one table")
        if not self.bottom or self.bottom[-1] != self.dim:
            raise ValueError(
                f"DLRMConfig.bottom {self.bottom!r} must end in dim={self.dim}: the bottom MLP's output is "
                "dotted with the embedding rows"
            )
        if self.mode not in ("sum", "mean", "max"):
            raise ValueError(f"DLRMConfig.mode must be 'sum', 'mean' or 'max', got {self.mode!r}")
        if self.sparse and self.mode == "max":
            raise ValueError("DLRMConfig.sparse needs mode 'sum' or 'mean': nn.EmbeddingBag has no sparse 'max'")


class DLRM(nn.Module):
    """``model(dense, ids_0, offsets_0, ..., labels)`` is the mean binary cross-entropy of click logits.

    ``ids_t`` (1-d int64) and ``offsets_t`` (1-d int64, one start per sample) are ``nn.EmbeddingBag``'s input
    for table ``t``; ``labels`` are (batch,) floats of 0 and 1.
    """

    def __init__(self, cfg: DLRMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.bottom = _mlp((cfg.dense_features, *cfg.bottom), last_relu=True)
        self.tables = nn.ModuleList(
            nn.EmbeddingBag(rows, cfg.dim, mode=cfg.mode, sparse=cfg.sparse) for rows in cfg.table_rows
        )
        n = len(cfg.table_rows) + 1
        self.top = _mlp((cfg.dim + n * (n - 1) // 2, *cfg.top, 1), last_relu=False)

    def forward(self, dense: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if len(rest) != 2 * len(self.tables) + 1:
            raise ValueError(
                f"DLRM takes dense, then ids and offsets of each of its {len(self.tables)} tables, then labels: "
                f"got {len(rest)} tensors after dense, expected {2 * len(self.tables) + 1}"
            )
        return bce_with_logits(self.logits(dense, *rest[:-1]), rest[-1])

    def predict(self, dense: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        """Click probabilities (batch,) of ``dense`` and the tables' ``ids_t, offsets_t``: what AUC is taken on."""
        return torch.sigmoid(self.logits(dense, *features))

    def logits(self, dense: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        """Click logits (batch,) of ``dense`` (batch, dense_features) and the tables' ``ids_t, offsets_t``."""
        if len(features) != 2 * len(self.tables):
            raise ValueError(
                f"DLRM.logits takes dense, then ids and offsets of each of its {len(self.tables)} tables: got "
                f"{len(features)} tensors after dense, expected {2 * len(self.tables)}"
            )
        x = self.bottom(dense)
        pooled = [table(features[2 * t], features[2 * t + 1]) for t, table in enumerate(self.tables)]
        return self.top(interact(x, pooled)).squeeze(1)


def interact(x: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
    """DLRM's dot interaction: ``x`` (B, dim) beside the dot products of every pair of ``x, *pooled``.

    Returns (B, dim + n(n-1)/2) for n = 1 + len(pooled): the strictly lower triangle of ``Z @ Z^T`` row by row.
    """
    z = torch.stack([x, *pooled], dim=1)  # (B, n, dim)
    zz = torch.bmm(z, z.transpose(1, 2))  # (B, n, n)
    # NOTE: row i's first i entries, by select + slice + cat. A fixed index tensor (index, index_select, gather)
    # or tril would also do, but their ops or their backward ops (index_put, index_add, scatter_add) have no
    # layout rule, and a constant tensor made in forward breaks fake-tensor tracing unless it is a buffer.
    tri = [zz[:, i, :i] for i in range(1, zz.shape[1])]
    return torch.cat([x, *tri], dim=1)


def bce_with_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean of ``F.binary_cross_entropy_with_logits(logits, labels)``, from ops that have layout rules.

    ``max(x, 0) - x*y + log(1 + exp(-|x|))`` with ``-|x| = x - 2*relu(x)``: stable for any ``x`` (the exp is
    at most 1). ATen's fused op has no layout rule; as a reduction it would need more than a pointwise one.
    """
    r = torch.relu(logits)
    return (r - logits * labels + torch.log(1 + torch.exp(logits - 2 * r))).mean()


def _mlp(widths: Sequence[int], *, last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if last_relu or i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
