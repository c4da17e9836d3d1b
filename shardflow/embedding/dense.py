"""The dense model: the user's model with each table replaced by a stub that returns the pooled vectors
given as extra inputs, so the compiler traces, lowers and runs it as any other model.

Its methods take the inputs that do not feed tables, then one pooled tensor per lookup, in call order;
the ids and offsets positions get empty tensors (the element-wise transforms on them then cost nothing).
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shardflow.embedding.lookups import Lookups, stub_tree

_NO_IDS = torch.empty(0, dtype=torch.int64)  # made once, outside tracing: a constant of the traced program


class PooledSlot(nn.Module):
    """Stands for a table in the dense model: each call returns the next value it was handed."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.table = name
        self.queue: list[torch.Tensor] = []

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.queue:
            raise RuntimeError(f"table {self.table!r} was called more often than when its lookups were traced")
        return self.queue.pop(0)


def dense_model(model: nn.Module, tables: Sequence[str]) -> nn.Module:
    """The user's model (modules shared, not copied) with stubs for ``tables``; its methods are patched by
    ``add_method`` once their lookups are known."""
    root = stub_tree(model, tables, PooledSlot)
    root.__dict__["_sf_lookups"] = {}
    return root


def add_method(root: nn.Module, method: str, lookups: Lookups) -> None:
    """Make ``root.<method>`` take (dense inputs..., pooled...) for the lookups traced for it."""
    root.__dict__["_sf_lookups"][method] = lookups
    root.__dict__[method] = types.MethodType(_dense_method(method), root)


def _dense_method(method: str) -> Any:
    def call(self: nn.Module, *args: Any) -> Any:
        lookups: Lookups = self.__dict__["_sf_lookups"][method]
        n_dense = lookups.n_inputs - len(lookups.sparse)
        dense, pooled = list(args[:n_dense]), list(args[n_dense:])
        if len(pooled) != len(lookups.calls):
            raise AssertionError(f"{method}: {len(pooled)} pooled inputs for {len(lookups.calls)} lookups")
        slots = {m.table: m for m in self.modules() if isinstance(m, PooledSlot)}
        for slot in slots.values():
            slot.queue = []
        for c, value in zip(lookups.calls, pooled):
            slots[c.table].queue.append(value)
        full: list[Any] = []
        it = iter(dense)
        for i in range(lookups.n_inputs):
            full.append(_NO_IDS if i in lookups.sparse else next(it))
        return getattr(type(self), method)(self, *full)

    return call
