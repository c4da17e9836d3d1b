"""``sf.Embeddings``: which embedding modules become sharded tables, where they live, and how they learn.

The spec is what a user writes; the placements the planner chooses from it are entries of the plan
(``plan/record.py``'s ``TablePlan``). The optimizers are records, not torch optimizers: the update of a
table runs where its rows live, fused with the gradient exchange (``embedding/optimizers.py``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shardflow.plan.record import TABLE_PLACEMENTS as PLACEMENTS


@dataclass(frozen=True)
class SGD:
    """``torch.optim.SGD(lr)`` on the gradient of ``nn.EmbeddingBag(sparse=True)``: touched rows only."""

    lr: float


@dataclass(frozen=True)
class Adagrad:
    """``torch.optim.Adagrad(lr, eps)``: a squared-gradient sum per element, beside the rows."""

    lr: float
    eps: float = 1e-10


@dataclass(frozen=True)
class SparseAdam:
    """``torch.optim.SparseAdam(lr, betas, eps)``: moments of touched rows only; one step count per table."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class RowWiseAdagrad:
    """FBGEMM's row-wise Adagrad: one accumulator per row, the mean of the row's squared gradient (over the
    whole row, also when the row's columns live on several ranks); ``eps`` FBGEMM's default."""

    lr: float
    eps: float = 1e-8


Optimizer = SGD | Adagrad | SparseAdam | RowWiseAdagrad


@dataclass(frozen=True)
class Tiers:
    """A tiered store behind the tables (device cache, RAM, SSD): a later piece of work; refused for now."""

    cache_rows: int | None = None
    ram_bytes: int | str | None = None
    path: str | None = None
    policy: str = "lru"


@dataclass(frozen=True)
class Embeddings:
    """``sf.compile(..., embeddings=sf.Embeddings(...))``: ``tables`` globs over module names choose the
    ``nn.EmbeddingBag``/``nn.Embedding`` modules that become sharded tables; ``placement`` maps globs to
    ``"row"``, ``"column"``, ``"table"`` or ``"replicated"`` (unmatched tables: the planner decides);
    ``optimizer`` updates the tables (the dense parameters keep ``sf.compile``'s ``optimizer=``, and
    ``max_grad_norm`` clips their gradients only: a fused table update is not clipped, as with TorchRec's
    fused optimizers); ``seed`` initialises tables built on the meta device (``init_rows``)."""

    tables: str | Sequence[str] = "*"
    placement: Mapping[str, str] | None = None
    optimizer: Optimizer = field(default_factory=lambda: SGD(0.01))
    tiers: Tiers | None = None
    servers: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        globs = (self.tables,) if isinstance(self.tables, str) else tuple(self.tables)
        if not globs or not all(isinstance(g, str) for g in globs):
            raise TypeError(f"Embeddings(tables={self.tables!r}): a glob or a list of globs over module names")
        object.__setattr__(self, "tables", globs)
        for glob, where in dict(self.placement or {}).items():
            if where not in PLACEMENTS:
                raise ValueError(f"Embeddings(placement={{{glob!r}: {where!r}}}): a placement is one of {PLACEMENTS}")
        if not isinstance(self.optimizer, (SGD, Adagrad, SparseAdam, RowWiseAdagrad)):
            raise TypeError(
                f"Embeddings(optimizer={self.optimizer!r}): one of sf.embedding.SGD, Adagrad, SparseAdam, "
                "RowWiseAdagrad (the dense parameters keep sf.compile's optimizer=)"
            )
        if self.tiers is not None:
            raise NotImplementedError(
                "Embeddings(tiers=...): tiered SSD/RAM/device tables are not built yet (a later release); "
                "leave tiers=None: tables live in each rank's memory"
            )
        if self.servers is not None:
            raise NotImplementedError(
                f"Embeddings(servers={self.servers!r}): parameter servers are not built yet (a later release); "
                "leave servers=None: tables are sharded over the trainers by all-to-all"
            )

    def chosen(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.tables)

    def placement_of(self, name: str) -> str | None:
        """The placement a glob of ``placement`` asks for ``name`` (the first that matches), or None."""
        for glob, where in dict(self.placement or {}).items():
            if fnmatch.fnmatchcase(name, glob):
                return where
        return None


def optimizer_state(opt: Any) -> tuple[str, ...]:
    """The names of the per-row state an optimizer keeps beside a table's rows (``row``: one per row)."""
    if isinstance(opt, Adagrad):
        return ("sum",)
    if isinstance(opt, SparseAdam):
        return ("exp_avg", "exp_avg_sq")
    if isinstance(opt, RowWiseAdagrad):
        return ("momentum",)
    return ()
