"""Which embedding modules become tables, and which of a method's inputs feed each lookup (found by tracing).

The model stays unmodified: a copy of its module tree shares every module but the tables, which are
replaced by stubs (``stub_tree``). Traced once with recording stubs, a method shows which positional
inputs reach each lookup and what element-wise transform (``ids % rows``) the forward applies first; that
transform is kept as a small graph run on each batch's ids before the exchange (no graph at all when the
inputs reach the tables as they are). The dense program is traced with stubs that return the pooled
vectors, given as extra inputs (``embedding/dense.py``).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

from shardflow.embedding.spec import Embeddings
from shardflow.runtime.capture_errors import explained

Table = nn.EmbeddingBag | nn.Embedding


@dataclass(frozen=True)
class TableModule:
    """One table as the model declares it."""

    name: str
    rows: int
    dim: int
    bag: bool  # nn.EmbeddingBag (pooled) or nn.Embedding (one vector per id)
    mode: str  # "sum", "mean", "max"; "none" for nn.Embedding
    padding_idx: int | None
    include_last_offset: bool
    meta: bool  # built on the meta device: initialised by init_rows


def find_tables(model: nn.Module, spec: Embeddings) -> list[TableModule]:
    """The embedding modules ``spec.tables`` chooses, checked: each a clear error if it cannot be a table."""
    found: list[TableModule] = []
    kinds = [n for n, m in model.named_modules() if isinstance(m, (nn.EmbeddingBag, nn.Embedding))]
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name, m in model.named_modules():
        if not isinstance(m, (nn.EmbeddingBag, nn.Embedding)) or not spec.chosen(name):
            continue
        what = f"table {name!r} ({type(m).__name__})"
        if m.max_norm is not None:
            raise ValueError(
                f"{what} has max_norm={m.max_norm}: renormalising rows inside the lookup changes the table in "
                "forward, which sharded tables do not do; build it with max_norm=None"
            )
        if m.scale_grad_by_freq:
            raise ValueError(f"{what} has scale_grad_by_freq=True: not supported for sharded tables; leave it False")
        tied = [n for n in owners[id(m.weight)] if n != f"{name}.weight"]
        if tied:
            raise ValueError(
                f"{what}: its weight is tied to {tied}; a sharded table cannot share its storage with another "
                "parameter: untie them, or leave this module out of Embeddings(tables=...)"
            )
        bag = isinstance(m, nn.EmbeddingBag)
        found.append(
            TableModule(
                name,
                m.num_embeddings,
                m.embedding_dim,
                bag,
                str(m.mode) if bag else "none",
                m.padding_idx,
                bool(getattr(m, "include_last_offset", False)),
                m.weight.is_meta,
            )
        )
    if not found:
        raise ValueError(
            f"Embeddings(tables={list(spec.tables)}) matches no nn.EmbeddingBag or nn.Embedding of "
            f"{type(model).__name__}; its embedding modules are {kinds or 'none'}"
        )
    names = [t.name for t in found]
    idle = [g for g in spec.tables if not any(fnmatch.fnmatchcase(n, g) for n in names)]
    idle += [g for g in dict(spec.placement or {}) if not any(fnmatch.fnmatchcase(n, g) for n in names)]
    if idle:  # a misspelt glob would otherwise leave a table where the planner puts it, silently
        raise ValueError(f"Embeddings globs {idle} match none of the tables {names}: correct or remove them")
    return found


def stub_tree(model: nn.Module, names: Sequence[str], make: Callable[[str], nn.Module]) -> nn.Module:
    """A copy of ``model`` sharing every module except those named, each replaced by ``make(name)``: only
    the modules on the path to a table are copied (shallowly), so the user's model is left as it was."""
    root = copy.copy(model)
    root._modules = dict(model._modules)
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            child = copy.copy(parent.get_submodule(part))
            child._modules = dict(child._modules)
            parent._modules[part] = child
            parent = child
        parent._modules[leaf] = make(name)
    return root


class _Recorder(nn.Module):
    """Records each call's ids, offsets and per-sample weights; returns zeros of the lookup's shape."""

    def __init__(self, table: TableModule, calls: list[Call], args: list[torch.Tensor]) -> None:
        super().__init__()
        self.table, self.calls, self.args = table, calls, args

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None, per_sample_weights: Any = None) -> Any:
        t = self.table
        where = f"table {t.name!r}"
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{where} got ids of dtype {ids.dtype}: ids are int64 (or int32) tensors")
        if not t.bag:
            if offsets is not None:
                raise TypeError(f"{where} is an nn.Embedding: it takes ids only")
            shape: tuple[int, ...] = (*ids.shape, t.dim)
        elif ids.dim() == 2:
            if offsets is not None:
                raise ValueError(f"{where}: 2-D ids (fixed-size bags) take no offsets, as nn.EmbeddingBag")
            shape = (ids.shape[0], t.dim)
        elif ids.dim() == 1:
            if offsets is None or offsets.dim() != 1:
                raise ValueError(f"{where}: 1-D ids need 1-D offsets (nn.EmbeddingBag's format)")
            shape = (offsets.shape[0] - int(t.include_last_offset), t.dim)
        else:
            raise ValueError(f"{where}: ids must be 1-D (with offsets) or 2-D, got shape {tuple(ids.shape)}")
        if per_sample_weights is not None and (not t.bag or t.mode != "sum"):
            raise ValueError(f"{where}: per_sample_weights need an nn.EmbeddingBag with mode='sum', as torch's")
        slots = []
        for x in (ids, offsets, per_sample_weights):
            slots.append(None if x is None else len(self.args))
            if x is not None:
                self.args.append(x)
        self.calls.append(Call(t.name, slots[0], slots[1], slots[2], shape))  # type: ignore[arg-type]
        return torch.zeros(shape, dtype=torch.float32, device=ids.device)


@dataclass(frozen=True)
class Call:
    """One lookup of a method, in call order: its table, and where its ids, offsets and per-sample weights
    are in the id program's results (``ids``, ``offsets``, ``weights``; None: not given)."""

    table: str
    ids: int
    offsets: int | None
    weights: int | None
    shape: tuple[int, ...]  # the pooled (or per-id) result of the example inputs


@dataclass
class Lookups:
    """A method's lookups: ``calls`` in order; ``sparse`` the positions of the inputs that only feed lookups
    (removed from the dense program); ``program`` maps the inputs to each call's tensors, or ``direct``
    says where each is among the inputs when the forward passes them on unchanged."""

    calls: list[Call]
    sparse: tuple[int, ...]
    n_inputs: int
    program: fx.GraphModule | None
    direct: tuple[int, ...] | None

    def arguments(self, inputs: Sequence[Any]) -> list[torch.Tensor]:
        """Each call's ids, offsets and weights for ``inputs`` (the global batch), flat in slot order."""
        if self.direct is not None:
            return [inputs[i] for i in self.direct]
        assert self.program is not None
        return list(self.program(*inputs))


def trace_lookups(model: nn.Module, method: str, tables: Sequence[TableModule], inputs: Sequence[Any]) -> Lookups:
    """Trace ``model.<method>(*inputs)`` with recording stubs (fake tensors): the lookups it makes, the inputs
    that feed them, and the element-wise transform between."""
    by_name = {t.name: t for t in tables}
    calls: list[Call] = []
    args: list[torch.Tensor] = []
    probe = stub_tree(model, list(by_name), lambda n: _Recorder(by_name[n], calls, args))

    def run(*xs: Any) -> list[torch.Tensor]:
        calls.clear()
        args.clear()
        getattr(probe, method)(*xs)
        return list(args)

    with explained(model, f"tracing which inputs feed {type(model).__name__}'s embedding tables"):
        graph = make_fx(run, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
    if not calls:
        raise ValueError(
            f"{type(model).__name__}.{method} made no lookup in the tables {list(by_name)} on the example inputs"
        )
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.graph.nodes if n.op == "output")
    results: list[fx.Node] = list(output.args[0])  # type: ignore[arg-type]
    feeding = _ancestors(results)
    sparse = tuple(i for i, p in enumerate(placeholders) if p in feeding)
    for i in sparse:  # an input the lookups read must not also feed the dense part (it leaves the dense program)
        for node in _descendants(placeholders[i]):
            if node not in feeding and node.op != "output":
                raise ValueError(
                    f"input {i} of {type(model).__name__}.{method} feeds an embedding table and also the rest of the "
                    f"model (at {node.target}); pass the ids and offsets only to the tables (give a copy as "
                    "another input if the dense part needs it)"
                )
    for node in feeding:
        if node.op == "call_function":
            _check_elementwise(node, type(model).__name__, method)
        elif node.op == "get_attr":
            raise ValueError(
                f"{type(model).__name__}.{method} transforms ids with a tensor of the model ({node.target}) before a "
                "lookup; only element-wise transforms by constants (such as ids % rows) are supported"
            )
    direct = None
    if all(r.op == "placeholder" for r in results):
        direct = tuple(placeholders.index(r) for r in results)
    program = None
    if direct is None:
        graph.graph.eliminate_dead_code()
        graph.recompile()
        program = graph
    return Lookups(list(calls), sparse, len(placeholders), program, direct)


def _check_elementwise(node: fx.Node, model: str, method: str) -> None:
    val = node.meta.get("val")
    ins = [a.meta.get("val") for a in node.all_input_nodes]
    shapes = {tuple(x.shape) for x in ins if isinstance(x, torch.Tensor)}
    if not isinstance(val, torch.Tensor) or tuple(val.shape) not in shapes:
        raise ValueError(
            f"{model}.{method} changes the shape of ids or offsets ({node.target}) before a lookup; only element-wise "
            "transforms (such as ids % rows) may come between an input and a table: reshape the input outside"
        )


def _ancestors(nodes: Sequence[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.users)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen
