"""Shared cases of the sparse-table tests: a small DLRM on Criteo-shaped batches, and its plain PyTorch
reference (``nn.EmbeddingBag(sparse=True)`` trained serially with the matching torch optimizer)."""

from __future__ import annotations

import copy
from typing import Any

import torch

import shardflow as sf
from shardflow.models import DLRM, CriteoShape, DLRMConfig, criteo_batch, dlrm_inputs

SHAPE = CriteoShape(scale=2e-6, multi_hot=True, alpha=1.05, seed=3)
CONFIG = DLRMConfig(table_rows=SHAPE.table_rows, dim=4, bottom=(8, 4), top=(8,), mode="mean")  # sum: logits in the 100s
DENSE_LR = 0.005


def batch(index: int, size: int = 12) -> tuple[torch.Tensor, ...]:
    return dlrm_inputs(criteo_batch(SHAPE, size, index))


def model(seed: int = 0) -> DLRM:
    torch.manual_seed(seed)
    return DLRM(CONFIG)


def optimizer(kind: str) -> Any:
    return {
        "sgd": sf.embedding.SGD(0.005),
        "adagrad": sf.embedding.Adagrad(0.02),
        "adam": sf.embedding.SparseAdam(0.01),
        "rowwise": sf.embedding.RowWiseAdagrad(0.02),
    }[kind]


class RowWiseAdagradReference(torch.optim.Optimizer):
    """FBGEMM's exact row-wise Adagrad on a sparse gradient, written from its formula: one accumulator per
    row, ``acc[r] += mean(g[r]^2)``, ``w[r] -= lr * g[r] / (sqrt(acc[r]) + eps)``, touched rows only."""

    def __init__(self, params: Any, lr: float, eps: float = 1e-8) -> None:  # FBGEMM's default eps
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.coalesce()
                rows, values = g.indices()[0], g.values()
                acc = self.state[p].setdefault("acc", torch.zeros(p.shape[0]))
                acc[rows] += (values * values).mean(dim=1)
                p[rows] -= group["lr"] * values / (acc[rows].sqrt() + group["eps"])[:, None]


def reference(kind: str, seed: int = 0) -> tuple[DLRM, list[torch.optim.Optimizer]]:
    """The plain model with sparse tables and the torch optimizers matching ``kind``."""
    ref = copy.deepcopy(model(seed))
    for t in ref.tables:
        t.sparse = True
    tables = [t.weight for t in ref.tables]
    dense = [p for n, p in ref.named_parameters() if not n.startswith("tables.")]
    sparse: torch.optim.Optimizer = {
        "sgd": lambda: torch.optim.SGD(tables, lr=0.005),
        "adagrad": lambda: torch.optim.Adagrad(tables, lr=0.02, eps=1e-10),
        "adam": lambda: torch.optim.SparseAdam(tables, lr=0.01),
        "rowwise": lambda: RowWiseAdagradReference(tables, lr=0.02),
    }[kind]()
    return ref, [torch.optim.SGD(dense, lr=DENSE_LR), sparse]


def reference_run(kind: str, steps: int, size: int = 12) -> tuple[list[float], dict[str, torch.Tensor]]:
    ref, opts = reference(kind)
    losses = []
    for s in range(steps):
        for o in opts:
            o.zero_grad()
        loss = ref(*batch(s, size))
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in ref.state_dict().items()}


def predictions(state: dict[str, torch.Tensor], size: int = 12) -> torch.Tensor:
    """The plain model's click probabilities on a held-out batch, with the weights ``state``."""
    plain = model()
    plain.load_state_dict(state)
    with torch.no_grad():
        return plain.predict(*batch(99, size)[:-1])


def compiled(placement: Any, kind: str, mesh: sf.Mesh, seed: int = 0, size: int = 12) -> Any:
    return sf.compile(
        model(seed),
        mesh,
        example_inputs=batch(0, size),
        optimizer=lambda ps: torch.optim.SGD(ps, lr=DENSE_LR),
        embeddings=sf.Embeddings(placement=placement, optimizer=optimizer(kind)),
    )
