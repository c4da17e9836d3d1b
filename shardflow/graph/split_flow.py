"""Where a split of one dim of a value goes through one op of a captured (``torch.export``) graph.

The tensor-parallel strategy (``graph/strategy.py``) follows a column linear's output, split along its
feature dim, op by op to the linear that consumes it. ``moved`` answers for one op: the dim of the op's
output that carries the split, or None where the op needs that dim whole (a softmax, a reduction or a
contraction over it, a slice or a concatenation along it, a norm over it) or is not known here.

Given ``ways`` (the tensor-parallel axis's size), a view must keep every one of the ``ways`` pieces a
``tensor_split`` piece of its output dim (``view_dim_map``, what the view rule checks), so a split that
would cut an attention head in two (two key/value heads over four ranks) is not taken for a head split.
Without it (a pipeline's stages may differ in size) a view moves the split to the outermost dim of the
group it lands in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from shardflow.ops.rules.shape import view_dim_map

aten = torch.ops.aten

_VIEWS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
}  # fmt: skip
# ops that keep their input's shape and are not tagged pointwise (dtype casts, copies, dropout)
_SAME = {
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.contiguous.default,
    aten.clone.default, aten.dropout.default, aten.alias.default, aten.detach.default, aten.type_as.default,
}  # fmt: skip
_ALONG = {  # ops that need their dim (at this argument index, this default) whole, and keep the others
    aten.slice.Tensor: (1, 0), aten.narrow.default: (1, 0), aten.cat.default: (1, 0),
    aten.softmax.int: (1, None), aten._softmax.default: (1, None), aten.log_softmax.int: (1, None),
    aten._log_softmax.default: (1, None),
}  # fmt: skip
_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default}
_NORMS = {aten.layer_norm.default, aten.rms_norm.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}


def arg(node: Any, i: int, name: str, default: Any) -> Any:
    """Argument ``i`` (keyword ``name``) of ``node``'s call."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def shape_of(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def view_dim(src: Sequence[int], dst: Sequence[int], dim: int, ways: int | None) -> int | None:
    """The dim of ``dst`` that a split of ``src``'s ``dim`` lands on when viewed as ``dst``."""
    if ways is not None and ways > 1:
        found = view_dim_map(src, dst, ways).get(dim)
        return None if found is None else found[0]
    if math.prod(src) != math.prod(dst):
        return None
    pre = math.prod(src[:dim])
    for e, n in enumerate(dst):
        if n > 1 and math.prod(dst[:e]) == pre and (src[dim] % n == 0 or n % src[dim] == 0):
            return e
    return None


def split_parts(node: Any, dim: int) -> int | None:
    """For a split/chunk ``node``: None where it splits another dim than ``dim``; else into how many equal
    parts it splits ``dim`` (0 where they are not equal)."""
    src = shape_of(node.args[0])
    assert src is not None
    along = arg(node, 2, "dim", 0) % len(src)
    if along != dim:
        return None
    n = src[dim]
    if node.target is aten.chunk.default:
        k = node.args[1]
        return k if n % k == 0 else 0
    if node.target is aten.split.Tensor:
        size = node.args[1]
        return n // size if size and n % size == 0 else 0
    sizes = list(node.args[1])
    return len(sizes) if len(set(sizes)) == 1 else 0


def moved(node: Any, value: Any, dim: int, ways: int | None) -> int | None:
    """The dim of ``node``'s output carrying the split of ``value``'s ``dim``, or None where ``node`` needs
    that dim whole or is not an op known here (``value`` is one of ``node``'s inputs)."""
    src, out = shape_of(value), shape_of(node)
    if src is None or out is None or node.op != "call_function":
        return None
    t, nd = node.target, len(src)
    if t in _VIEWS:
        return view_dim(src, out, dim, ways)
    if t is aten.transpose.int:
        a, b = node.args[1] % nd, node.args[2] % nd
        return b if dim == a else a if dim == b else dim
    if t is aten.permute.default:
        return [d % nd for d in node.args[1]].index(dim)
    if t is aten.t.default:
        return nd - 1 - dim if nd == 2 else dim
    if t is aten.expand.default:
        e = dim + len(out) - nd
        return e if out[e] == src[dim] else None
    if t in _ALONG:
        i, default = _ALONG[t]
        along = arg(node, i, "dim", default)
        return None if along is None or along % nd == dim else dim
    if t is aten.select.int:
        along = node.args[1] % nd
        return None if along == dim else dim - (along < dim)
    if t in _REDUCTIONS:
        return _reduced(node, nd, dim)
    if t in _NORMS:
        return dim if dim < nd - len(node.args[1]) else None
    if t is aten.matmul.default:
        return _matmul(node, value, dim, out)
    if t is aten.scaled_dot_product_attention.default:
        # batch and head dims of q, k and v pass to the output; the sequence and feature dims mix
        if value in node.args[:3] and value not in node.args[3:] + tuple(node.kwargs.values()):
            return dim if dim < nd - 2 else None
        return None
    if t is aten.type_as.default and node.args[0] is not value:
        return None  # its second argument gives only a dtype: the split does not flow through it
    if t in _SAME or (isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags):
        e = dim + len(out) - nd  # broadcasting aligns dims from the right
        return e if out[e] == src[dim] else None
    return None


def _reduced(node: Any, nd: int, dim: int) -> int | None:
    dims = arg(node, 1, "dim", None)
    if not dims:
        return None  # all dims
    gone = {d % nd for d in dims}
    if dim in gone:
        return None
    return dim if arg(node, 2, "keepdim", False) else dim - sum(1 for g in gone if g < dim)


def _matmul(node: Any, value: Any, dim: int, out: tuple[int, ...]) -> int | None:
    """A split of a batch dim, of the first operand's rows or of the second's columns passes; one of the
    contracted dim needs a sum over ranks (a row-parallel linear has a weight: strategy.py ends there)."""
    shapes = [shape_of(a) for a in node.args[:2]]
    if any(s is None or len(s) < 2 for s in shapes):
        return None
    found = set()
    for i, (a, s) in enumerate(zip(node.args[:2], shapes)):
        if a is not value or s is None:
            continue
        nd = len(s)
        if dim < nd - 2:
            found.add(dim + len(out) - nd)
        elif dim == nd - 2 + i:  # rows of the first, columns of the second
            found.add(len(out) - 2 + i)
        else:
            return None
    return found.pop() if len(found) == 1 else None
