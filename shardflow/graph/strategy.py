"""Parameter layouts from a strategy and hints.

``dp`` keeps every parameter whole (``B``) and splits the batch over the data-parallel axis. ``tp`` finds
Megatron pairs in the captured graph: a ``linear`` whose output, split along its feature dim, reaches
another ``linear``'s input feature dim through ops that keep that split (shape ops, element-wise ones,
dtype casts, dropout, softmax and attention over other dims: ``graph/split_flow.py`` follows it op by
op) and reaches nothing else is column-parallel (weight ``S(0)``, bias ``S(0)``); the second is
row-parallel (weight ``S(1)``), so a block needs one all-reduce after each pair. Element-wise ops that join
other values (a residual add) are safe to follow: a path leaving the pair ends at an op that needs the dim
whole, or at the output, and disqualifies it. On an axis of ``ways`` ranks every view on the way must keep
the split exact, so attention is split by whole heads (query heads over four ranks, but not two key/value
heads: those projections stay whole). A fused column linear whose output is split into ``k`` equal parts
(attention's ``c_attn`` into q, k and v) is split by block, ``Blocked(0, k)``: each rank holds its heads of
every part, as Megatron's own fused QKV does by storing the weight interleaved per head; here the user's
weight keeps its layout. ``hybrid`` does both on axes ``dp`` and ``tp``. The plan transforms
(graph/transforms/) apply these layouts; hints (``{glob: sbp}``) override any of it there.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch

from shardflow.graph import split_flow
from shardflow.graph.capture import Captured
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import Blocked, Placement, S
from shardflow.plan import STRATEGIES, MeshSpec

aten = torch.ops.aten


def axes_for(mesh: Mesh | MeshSpec, strategy: str, pipeline_axis: str | None = None) -> tuple[int | None, int | None]:
    """(data-parallel axis, tensor-parallel axis) of ``mesh`` under ``strategy``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    free = [i for i, n in enumerate(mesh.names) if n != pipeline_axis]
    if strategy == "hybrid":
        missing = [n for n in ("dp", "tp") if n not in mesh.names]
        if missing:
            raise ValueError(f"strategy 'hybrid' needs mesh axes named 'dp' and 'tp'; {mesh} lacks {missing}")
        return mesh.names.index("dp"), mesh.names.index("tp")
    name = strategy
    if name in mesh.names:
        axis = mesh.names.index(name)
    elif len(free) == 1:
        axis = free[0]  # a 1-d mesh: its only axis, whatever its name
    else:
        raise ValueError(f"strategy {strategy!r} needs a mesh axis named {strategy!r} (or a 1-d mesh); got {mesh}")
    return (axis, None) if strategy == "dp" else (None, axis)


# linear-like ops and where their weight is: ``linear(x, w[out, in])``; ``addmm(b, x, w[in, out])`` and
# ``matmul(x, w[in, out])`` (Hugging Face's Conv1D)
_WEIGHT_ARG = {aten.linear.default: 1, aten.addmm.default: 2, aten.matmul.default: 1, aten.mm.default: 1}
_INPUT_ARG = {aten.linear.default: 0, aten.addmm.default: 1, aten.matmul.default: 0, aten.mm.default: 0}


def _linear_weight(node: Any, param_of: Mapping[str, str]) -> str | None:
    if node.op == "call_function" and node.target in _WEIGHT_ARG:
        w = node.args[_WEIGHT_ARG[node.target]]
        return param_of.get(getattr(w, "name", ""))
    return None


def _transposed(captured: Captured) -> set[str]:
    """Weights stored ``[in, out]`` (used by addmm/matmul, not linear)."""
    out = set()
    for node in captured.program.graph.nodes:
        name = _linear_weight(node, captured.param_of)
        if name is not None and node.target is not aten.linear.default:
            out.add(name)
    return out


def _column_reach(node: Any, param_of: Mapping[str, str], ways: int | None) -> tuple[str, int] | None:
    """(weight of the row linear, ``k``) where column linear ``node``'s output, split along its feature
    dim, reaches one row linear's input feature dim and nothing else; ``k`` > 1 where the output is split
    into ``k`` equal parts along that dim on the way (a fused projection such as ``c_attn``)."""
    out = split_flow.shape_of(node)
    if out is None:
        return None
    # (value, its dim carrying the split, k): k is None until the split dim is cut into parts or reshaped
    frontier: list[tuple[Any, int, int | None]] = [(node, len(out) - 1, None)]
    seen, ends, ks = set(), set(), set()
    while frontier:
        value, dim, k = frontier.pop()
        if (value, dim, k) in seen:
            continue
        seen.add((value, dim, k))
        for user in value.users:
            if user.target is aten._assert_tensor_metadata.default:
                continue  # a check export records, no value
            shape = split_flow.shape_of(value)
            assert shape is not None
            w = _linear_weight(user, param_of)
            if w is not None:
                if user.args[_INPUT_ARG[user.target]] is not value or dim != len(shape) - 1:
                    return None
                ends.add(w)
                ks.add(k or 1)
            elif user.target in split_flow.SPLITS:
                parts = split_flow.split_parts(user, dim)
                if parts is not None and (k is not None or parts < 2):
                    return None  # splits the split dim itself
                frontier += [(g, dim, k if parts is None else parts) for g in user.users]
            elif getattr(user.target, "__name__", "") == "getitem":
                return None  # an item of another op's results
            else:
                e = split_flow.moved(user, value, dim, ways)
                if e is None:
                    return None
                after = split_flow.shape_of(user)
                assert after is not None
                frontier.append((user, e, k if k is not None or after[e] == shape[dim] else 1))
    if len(ends) != 1 or len(ks) != 1:
        return None
    return ends.pop(), ks.pop()


def _pairs(captured: Captured, ways: int | None) -> list[tuple[str, str, int]]:
    param_of = captured.param_of
    found = []
    for node in captured.program.graph.nodes:
        col = _linear_weight(node, param_of)
        reach = None if col is None else _column_reach(node, param_of, ways)
        if reach is not None:
            assert col is not None
            found.append((col, *reach))
    rows = {r for _, r, _ in found}
    cols = [c for c, _, _ in found]
    return [(c, r, k) for c, r, k in found if c not in rows and cols.count(c) == 1]


def megatron_pairs(captured: Captured, ways: int | None = None) -> list[tuple[str, str]]:
    """(column linear's weight name, row linear's weight name) for every Megatron pair in the graph, split
    ``ways`` ways (None: any number of ways the views allow)."""
    return [(c, r) for c, r, _ in _pairs(captured, ways)]


def megatron_placements(captured: Captured, params: Collection[str], ways: int | None = None) -> dict[str, Placement]:
    """The tensor-parallel axis's placement of every parameter in a Megatron pair (others: not listed);
    ``params``: the model's parameter names; ``ways``: the axis's size (None: not known)."""
    out: dict[str, Placement] = {}
    flipped = _transposed(captured)
    for col, row, k in _pairs(captured, ways):
        dim = 1 if col in flipped else 0
        out[col] = S(dim) if k == 1 else Blocked(dim, k)
        bias = col.rsplit(".", 1)[0] + ".bias"
        if bias in params:
            out[bias] = S(0) if k == 1 else Blocked(0, k)
        out[row] = S(0) if row in flipped else S(1)
    return out
