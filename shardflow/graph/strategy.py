"""Parameter layouts from a strategy and hints.

``dp`` keeps every parameter whole (``B``) and splits the batch over the data-parallel axis. ``tp`` finds
Megatron pairs in the captured graph: a ``linear`` whose output reaches another ``linear`` only through
shape ops, element-wise activations, dropout and attention is column-parallel (weight ``S(0)``, bias
``S(0)``) and the second is row-parallel (weight ``S(1)``), so a block needs one all-reduce after each
pair. A fused column linear whose output is split into ``k`` equal parts (attention's ``c_attn`` into q, k
and v) is split by block, ``Blocked(0, k)``: each rank holds its heads of every part, as Megatron's own
fused QKV does by storing the weight interleaved per head; here the user's weight keeps its layout.
``hybrid`` does both on axes ``dp`` and ``tp``. The plan transforms (graph/transforms/) apply these layouts;
hints (``{glob: sbp}``) override any of it there.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch

from shardflow.graph.capture import Captured
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import Blocked, Placement, S
from shardflow.plan import STRATEGIES, MeshSpec

aten = torch.ops.aten

# ops a Megatron pair may have between its two linears: they keep the column split on the feature dims
_THROUGH = {
    aten.split.Tensor, aten.split_with_sizes.default, aten.view.default, aten.reshape.default,
    aten.transpose.int, aten.permute.default, aten.contiguous.default, aten.clone.default,
    aten.scaled_dot_product_attention.default, aten.gelu.default, aten.relu.default, aten.silu.default,
    aten.tanh.default, aten.dropout.default, aten.mul.Tensor, aten.unflatten.int, aten.flatten.using_ints,
    aten.cat.default, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.pow.Tensor_Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.sigmoid.default,
}  # fmt: skip
# NOTE: element-wise ops that could join other values (add.Tensor) are safe here: a path that leaves the
# pair (a residual add feeding the next block) reaches a non-pass-through op and disqualifies the pair.


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


_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}


def fused_blocks(captured: Captured) -> dict[str, int]:
    """``{weight name: k}`` for linears whose output (through reshapes keeping its last dim) is only split
    into ``k`` equal parts along that dim: fused projections such as ``c_attn``."""
    out = {}
    for node in captured.program.graph.nodes:
        name = _linear_weight(node, captured.param_of)
        if name is None:
            continue
        width = node.meta["val"].shape[-1]
        frontier, counts = list(node.users), set()
        while frontier:
            n = frontier.pop()
            val = n.meta.get("val")
            if n.target in _RESHAPES and isinstance(val, torch.Tensor) and val.shape[-1] == width:
                frontier.extend(n.users)
                continue
            counts.add(_equal_parts(n, width))
        if len(counts) == 1 and (k := counts.pop()) >= 2:
            out[name] = k
    return out


def _equal_parts(node: Any, width: int) -> int:
    """Into how many equal parts ``node`` splits the last dim (size ``width``) of its input; 0 otherwise."""
    if node.op != "call_function" or node.target not in _SPLITS:
        return 0
    ndim = node.args[0].meta["val"].dim()
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if dim % ndim != ndim - 1:
        return 0
    if node.target is aten.split.Tensor:
        size = node.args[1]
        return width // size if size and width % size == 0 else 0
    sizes = list(node.args[1])
    return len(sizes) if len(set(sizes)) == 1 else 0


def megatron_pairs(captured: Captured) -> list[tuple[str, str]]:
    """(column linear's weight name, row linear's weight name) for every Megatron pair in the graph."""
    param_of = captured.param_of
    pairs = []
    for node in captured.program.graph.nodes:
        first = _linear_weight(node, param_of)
        if first is None:
            continue
        seen, frontier, ends = set(), list(node.users), set()
        while frontier:
            n = frontier.pop()
            if n in seen:
                continue
            seen.add(n)
            w = _linear_weight(n, param_of)
            if w is not None:
                ends.add(w)
            elif n.op == "call_function" and (n.target in _THROUGH or getattr(n.target, "__name__", "") == "getitem"):
                frontier.extend(n.users)
            else:
                ends.add("")  # the output escapes the pair: not a clean column linear
        if len(ends) == 1 and "" not in ends:
            pairs.append((first, ends.pop()))
    cols = [c for c, _ in pairs]
    rows = {r for _, r in pairs}
    return [(c, r) for c, r in pairs if c not in rows and cols.count(c) == 1]


def megatron_placements(captured: Captured, params: Collection[str]) -> dict[str, Placement]:
    """The tensor-parallel axis's placement of every parameter in a Megatron pair (others: not listed);
    ``params``: the model's parameter names."""
    out: dict[str, Placement] = {}
    flipped, fused = _transposed(captured), fused_blocks(captured)
    for col, row in megatron_pairs(captured):
        k = fused.get(col)
        dim = 1 if col in flipped else 0
        out[col] = S(dim) if k is None else Blocked(dim, k)
        bias = col.rsplit(".", 1)[0] + ".bias"
        if bias in params:
            out[bias] = S(0) if k is None else Blocked(0, k)
        out[row] = S(0) if row in flipped else S(1)
    return out
