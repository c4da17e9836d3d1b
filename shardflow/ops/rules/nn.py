"""Neural-network ops: softmax, losses, normalisation, embedding, convolution, pooling (attention: attention.py).

The usual pattern: a split of a dim the op works along independently (batch, heads, a normalised row's
leading dims) passes through; gradients of weights shared by every row come out ``P`` where the rows are
split; backward ops are linear in the arriving gradient, so ``P`` gradients pass through them.
Where the shard computation needs global information (the total weight of a mean loss over the global
batch, batch-norm statistics over the global batch) a ``local`` function communicates it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from shardflow.ops.registry import (
    B,
    InnerBox,
    Inside,
    LocalContext,
    OpCall,
    P,
    S,
    Sig,
    TensorMeta,
    inside,
    local,
    rule,
    workspace,
)
from shardflow.placement.sbp import NdSbp, Placement
from shardflow.placement.shard import local_shape, shard_box

aten = torch.ops.aten


# -- helpers ------------------------------------------------------------------------------------------------


def _slots(call: OpCall) -> list[int]:
    """Schema positions of the tensor arguments, in the flatten order of ``call.tensors``."""
    names = [a.name for a in call.func._schema.arguments]
    slots = [i for i, a in enumerate(call.args) if isinstance(a, TensorMeta)]
    return slots + [names.index(n) for n, v in call.kwargs.items() if isinstance(v, TensorMeta)]


def _arg(call: OpCall, i: int, default: Any = None) -> Any:
    """Argument ``i`` of the schema, positional or keyword."""
    if len(call.args) > i:
        return call.args[i]
    name = call.func._schema.arguments[i].name
    return call.kwargs.get(name, default)


def _meta(call: OpCall, i: int) -> TensorMeta | None:
    a = _arg(call, i)
    return a if isinstance(a, TensorMeta) else None


def sig(call: OpCall, place: dict[int, Placement], outs: Sequence[Placement], rest: Placement = B) -> Sig:
    """A signature from placements by schema position; tensor arguments not named get ``rest``."""
    return Sig(tuple(place.get(i, rest) for i in _slots(call)), tuple(outs))


def _masked(outs: Sequence[Placement], mask: Sequence[bool]) -> tuple[Placement, ...]:
    """Outputs of an op that returns None where ``output_mask`` is False (only tensors count)."""
    return tuple(p for p, m in zip(outs, mask) if m)


def _all_b(call: OpCall, n_out: int) -> Sig:
    return Sig((B,) * len(call.tensors), (B,) * n_out)


def _split_any(ins: NdSbp) -> bool:
    return any(isinstance(p, S) for p in ins)


def _sum_over_splits(ctx: LocalContext, t: torch.Tensor, like: NdSbp) -> torch.Tensor:
    """All-reduce ``t`` (a per-shard partial result) over the mesh axes on which ``like`` is split."""
    return ctx.box(t, _partial_where_split(like), tuple(t.shape), (B,) * ctx.mesh.ndim)


def _partial_where_split(like: NdSbp) -> NdSbp:
    return tuple(P if isinstance(p, S) else B for p in like)


def _sums(ctx: LocalContext, shape: tuple[int, ...], n: int, kernels: int, passes: int) -> Inside:
    """``Inside`` of a local function that all-reduces ``n`` partial sums of ``shape`` (``_sum_over_splits``)."""
    box = InnerBox(shape, _partial_where_split(ctx.ins[0]), (B,) * ctx.mesh.ndim)
    return Inside((box,) * n, kernels, passes)


def _full_args(ctx: LocalContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """Every schema argument positionally (defaults filled in)."""
    out = list(args)
    for a in ctx.call.func._schema.arguments[len(args) :]:
        out.append(kwargs[a.name] if a.name in kwargs else a.default_value)
    return out


# -- softmax ----------------------------------------------------------------------------------------------


@rule(aten._softmax.default, aten._log_softmax.default)
def _softmax(call: OpCall, k: int) -> list[Sig]:
    nd = call.tensors[0].ndim
    along = call.args[1] % max(nd, 1)
    return [Sig((S(d),), (S(d),)) for d in range(nd) if d != along] + [Sig((B,), (B,))]


@rule(aten._softmax_backward_data.default, aten._log_softmax_backward_data.default)
def _softmax_backward(call: OpCall, k: int) -> list[Sig]:
    nd = call.tensors[0].ndim
    along = call.args[2] % max(nd, 1)
    sigs = [Sig((S(d), S(d)), (S(d),)) for d in range(nd) if d != along]
    return sigs + [Sig((P, B), (P,)), Sig((B, B), (B,))]  # linear in the gradient


# -- nll loss ---------------------------------------------------------------------------------------------

# nll_loss_forward(self, target, weight?, reduction, ignore_index) -> (output, total_weight)
# nll_loss_backward(grad_output, self, target, weight?, reduction, ignore_index, total_weight)
_NONE, _MEAN, _SUM = 0, 1, 2


@rule(aten.nll_loss_forward.default)
def _nll(call: OpCall, k: int) -> list[Sig]:
    x = call.tensors[0]
    red = _arg(call, 3, _MEAN)
    sigs = []
    if x.ndim == 2:  # batch-split: the loss sums (or means, see the local) over the global batch
        out = S(0) if red == _NONE else P
        sigs.append(sig(call, {0: S(0), 1: S(0)}, (out, P if red == _SUM else B)))
    sigs.append(sig(call, {0: P}, (P, B)))  # linear in the log-probabilities
    return sigs + [_all_b(call, 2)]


@local(aten.nll_loss_forward.default)
def _nll_local(ctx: LocalContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A mean over a split batch: the shard's weighted sum over the GLOBAL total weight (all-reduced)."""
    full = _full_args(ctx, args, kwargs)
    if full[3] != _MEAN or not _split_any(ctx.ins[0]):
        return ctx.call.func(*args, **kwargs)
    x, target, weight, _, ignore_index = full
    total, local_weight = aten.nll_loss_forward.default(x, target, weight, _SUM, ignore_index)
    weight_sum = _sum_over_splits(ctx, local_weight, ctx.ins[0])
    return total / weight_sum, weight_sum


@inside(aten.nll_loss_forward.default)
def _nll_inside(ctx: LocalContext) -> Inside:
    if _arg(ctx.call, 3, _MEAN) != _MEAN or not _split_any(ctx.ins[0]):
        return Inside()
    return _sums(ctx, (), 1, kernels=2, passes=0)  # the local sum, the division by the global weight


@rule(aten.nll_loss_backward.default)
def _nll_backward(call: OpCall, k: int) -> list[Sig]:
    # ``self`` only gives the shape (B and P shards agree), and so does ``total_weight`` unless mean
    x = call.tensors[1]
    red = _arg(call, 4, _MEAN)
    tw_any: list[Placement] = [B, P] if red != _MEAN else [B]
    sigs = []
    if x.ndim == 2:
        g = S(0) if red == _NONE else B
        sigs += [sig(call, {0: g, 1: S(0), 2: S(0), 6: tw}, (S(0),)) for tw in tw_any]
    shape_only: list[tuple[Placement, Placement]] = [(xp, tw) for xp in (B, P) for tw in tw_any]
    sigs += [sig(call, {0: P, 1: xp, 6: tw}, (P,)) for xp, tw in shape_only]  # linear in the gradient
    sigs += [sig(call, {1: xp, 6: tw}, (B,)) for xp, tw in shape_only if (xp, tw) != (B, B)]
    return sigs + [_all_b(call, 1)]


# -- layer norm -------------------------------------------------------------------------------------------


@rule(aten.native_layer_norm.default)
def _layer_norm(call: OpCall, k: int) -> list[Sig]:
    x = call.tensors[0]
    lead = x.ndim - len(call.args[1])
    return [sig(call, {0: S(d)}, (S(d),) * 3) for d in range(lead)] + [_all_b(call, 3)]


@rule(aten.native_layer_norm_backward.default)
def _layer_norm_backward(call: OpCall, k: int) -> list[Sig]:
    # (grad_out, input, normalized_shape, mean, rstd, weight?, bias?, output_mask)
    x = call.tensors[1]
    lead = x.ndim - len(call.args[2])
    mask = _arg(call, 7)
    sigs = [sig(call, {0: S(d), 1: S(d), 3: S(d), 4: S(d)}, _masked((S(d), P, P), mask)) for d in range(lead)]
    sigs.append(sig(call, {0: P}, _masked((P, P, P), mask)))  # linear in the gradient
    return sigs + [Sig((B,) * len(call.tensors), _masked((B, B, B), mask))]


# -- embedding --------------------------------------------------------------------------------------------


@rule(aten.embedding.default)
def _embedding(call: OpCall, k: int) -> list[Sig]:
    # (weight, indices, ...): rows looked up independently; weight columns are output columns
    idx = call.tensors[1]
    sigs = [Sig((B, S(d)), (S(d),)) for d in range(idx.ndim)]
    sigs += [Sig((S(1), B), (S(idx.ndim),)), Sig((P, B), (P,))]
    sigs.append(Sig((S(0), B), (P,)))  # vocab-parallel: each shard looks up the rows it holds (local)
    return sigs + [Sig((B, B), (B,))]


@local(aten.embedding.default)
def _embedding_local(ctx: LocalContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not any(p == S(0) for p in ctx.ins[0]):
        return ctx.call.func(*args, **kwargs)
    weight, idx = args[0], args[1]
    lo, hi = shard_box(ctx.call.tensors[0].shape, ctx.ins[0], ctx.mesh.shape, ctx.coord)[0]
    mine = (idx >= lo) & (idx < hi)
    rows = torch.where(mine, idx - lo, torch.zeros_like(idx))
    if weight.shape[0] == 0:  # no rows here: the lookup of nothing is zeros
        return weight.new_zeros((*idx.shape, weight.shape[1]))
    out = aten.embedding.default(weight, rows)
    return out * mine.unsqueeze(-1).to(out.dtype)


@rule(aten.embedding_dense_backward.default)
def _embedding_backward(call: OpCall, k: int) -> list[Sig]:
    # (grad_output, indices, num_weights, padding_idx, scale_grad_by_freq) -> weight grad
    g, idx = call.tensors[0], call.tensors[1]
    by_freq = bool(_arg(call, 4, False))
    sigs = [] if by_freq else [Sig((S(d), S(d)), (P,)) for d in range(idx.ndim)]  # counts must be global
    sigs += [Sig((S(g.ndim - 1), B), (S(1),)), Sig((P, B), (P,))]
    return sigs + [Sig((B, B), (B,))]


# -- batch norm ---------------------------------------------------------------------------------------------
# native_batch_norm(input, weight?, bias?, running_mean?, running_var?, training, momentum, eps)
#   -> (out, save_mean, save_invstd)
# Training: a split of any dim but the channels (1) computes the statistics over the GLOBAL batch with two
# all-reduces (sum, then the centred sum of squares: as precise as the serial two-pass), and updates the
# running statistics identically on every rank, so they must stay B. Evaluation is element-wise.


@rule(aten.native_batch_norm.default)
def _batch_norm(call: OpCall, k: int) -> list[Sig]:
    x = call.tensors[0]
    sigs = [sig(call, {0: S(d)}, (S(d), B, B)) for d in range(x.ndim) if d != 1]
    return sigs + [_all_b(call, 3)]


def _bn_shape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.ndim - 2)


@local(aten.native_batch_norm.default)
def _batch_norm_local(ctx: LocalContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, weight, bias, running_mean, running_var, training, momentum, eps = _full_args(ctx, args, kwargs)
    shapes = [s for s in ctx.out_shapes if s is not None]
    if not training or not _split_any(ctx.ins[0]):
        out, mean, invstd = ctx.call.func(*args, **kwargs)
        # CPU evaluation returns empty statistics where the meta kernel (our global shapes) has (C,)
        want = local_shape(shapes[1], ctx.outs[1], ctx.mesh.shape, ctx.coord)
        if tuple(mean.shape) != want:
            mean, invstd = x.new_zeros(want), x.new_zeros(want)
        return out, mean, invstd
    gshape = ctx.call.tensors[0].shape
    count = math.prod(gshape) // gshape[1]
    dims = [d for d in range(x.ndim) if d != 1]
    view = _bn_shape(x)
    mean = _sum_over_splits(ctx, x.sum(dims), ctx.ins[0]) / count
    centred = x - mean.view(view)
    var = _sum_over_splits(ctx, (centred * centred).sum(dims), ctx.ins[0]) / count
    invstd = torch.rsqrt(var + eps)
    out = centred * invstd.view(view)
    if weight is not None:
        out = out * weight.view(view)
    if bias is not None:
        out = out + bias.view(view)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        if running_var is not None:
            running_var.mul_(1 - momentum).add_(var * (count / max(count - 1, 1)), alpha=momentum)
    return out, mean, invstd


def _input_bytes(ctx: LocalContext, i: int) -> int:
    t = ctx.call.tensors[i]
    return math.prod(local_shape(t.shape, ctx.ins[i], ctx.mesh.shape, ctx.coord)) * t.dtype.itemsize


@workspace(aten.native_batch_norm.default)
def _batch_norm_workspace(ctx: LocalContext) -> int:
    # the split path: ``centred`` and one intermediate of the affine output live beside the output
    return 2 * _input_bytes(ctx, 0) if _split_any(ctx.ins[0]) else 0


@workspace(aten.native_batch_norm_backward.default)
def _batch_norm_backward_workspace(ctx: LocalContext) -> int:
    # the split path: ``xhat`` and the grad_input expression's three intermediates, at most three at once
    return 3 * _input_bytes(ctx, 1) if _split_any(ctx.ins[0]) else 0


# the split paths' kernels and passes over the input (reads and writes), counted from the locals above and below
@inside(aten.native_batch_norm.default)
def _batch_norm_inside(ctx: LocalContext) -> Inside:
    if not _arg(ctx.call, 5) or not _split_any(ctx.ins[0]):
        return Inside()
    return _sums(ctx, (ctx.call.tensors[0].shape[1],), 2, kernels=17, passes=12)


@inside(aten.native_batch_norm_backward.default)
def _batch_norm_backward_inside(ctx: LocalContext) -> Inside:
    if not _arg(ctx.call, 7) or not _split_any(ctx.ins[0]):
        return Inside()
    return _sums(ctx, (2 * ctx.call.tensors[1].shape[1],), 1, kernels=15, passes=20)


@rule(aten.native_batch_norm_backward.default)
def _batch_norm_backward(call: OpCall, k: int) -> list[Sig]:
    # (grad_out, input, weight?, running_mean?, running_var?, save_mean?, save_invstd?, train, eps, output_mask)
    x = call.tensors[1]
    train, mask = bool(_arg(call, 7)), _arg(call, 9)
    # training: weight/bias grads are the global sums the input grad needs anyway (all-reduced: B)
    wgrad = B if train else P
    sigs = [sig(call, {0: S(d), 1: S(d)}, _masked((S(d), wgrad, wgrad), mask)) for d in range(x.ndim) if d != 1]
    sigs.append(sig(call, {0: P}, _masked((P, P, P), mask)))  # linear in the gradient
    return sigs + [Sig((B,) * len(call.tensors), _masked((B, B, B), mask))]


@local(aten.native_batch_norm_backward.default)
def _batch_norm_backward_local(ctx: LocalContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    dy, x, weight, running_mean, running_var, save_mean, save_invstd, train, eps, mask = _full_args(ctx, args, kwargs)
    if not train or not _split_any(ctx.ins[0]):
        return ctx.call.func(*args, **kwargs)
    gshape = ctx.call.tensors[1].shape
    count = math.prod(gshape) // gshape[1]
    dims = [d for d in range(x.ndim) if d != 1]
    view = _bn_shape(x)
    xhat = (x - save_mean.view(view)) * save_invstd.view(view)
    sums = torch.cat([dy.sum(dims), (dy * xhat).sum(dims)])
    sums = _sum_over_splits(ctx, sums, ctx.ins[0])
    sum_dy, sum_dy_xhat = sums.chunk(2)
    grad_input = grad_weight = grad_bias = None
    if mask[0]:
        scale = save_invstd if weight is None else save_invstd * weight
        grad_input = (dy - sum_dy.view(view) / count - xhat * (sum_dy_xhat.view(view) / count)) * scale.view(view)
    if mask[1]:
        grad_weight = sum_dy_xhat.clone()
    if mask[2]:
        grad_bias = sum_dy.clone()
    return grad_input, grad_weight, grad_bias


# -- convolution --------------------------------------------------------------------------------------------


def _plain_conv(call: OpCall, transposed_at: int, groups_at: int) -> bool:
    """Channel splits need an ordinary (not transposed, ungrouped) convolution."""
    return not _arg(call, transposed_at) and _arg(call, groups_at) == 1


@rule(aten.convolution.default)
def _conv(call: OpCall, k: int) -> list[Sig]:
    # (input, weight, bias?, stride, padding, dilation, transposed, output_padding, groups)
    has_bias = _meta(call, 2) is not None
    sigs = [sig(call, {0: S(0)}, (S(0),))]
    if _plain_conv(call, 6, 8):
        sigs.append(sig(call, {1: S(0), 2: S(0)}, (S(1),)))  # output channels
        if not has_bias:
            sigs.append(sig(call, {0: S(1), 1: S(1)}, (P,)))  # input channels
    if not has_bias:  # linear in either operand only without the bias
        sigs += [sig(call, {0: P}, (P,)), sig(call, {1: P}, (P,))]
    return sigs + [_all_b(call, 1)]


@rule(aten.convolution_backward.default)
def _conv_backward(call: OpCall, k: int) -> list[Sig]:
    # (grad_output, input, weight, bias_sizes?, stride, padding, dilation, transposed, output_padding, groups,
    #  output_mask) -> (grad_input, grad_weight, grad_bias)
    mask = _arg(call, 10)
    sigs = [Sig((S(0), S(0), B), _masked((S(0), P, P), mask))]
    if _plain_conv(call, 7, 9):
        sigs.append(Sig((S(1), B, S(0)), _masked((P, S(0), S(0)), mask)))  # output channels
        sigs.append(Sig((B, S(1), S(1)), _masked((S(1), S(1), B), mask)))  # input channels
    sigs.append(Sig((P, B, B), _masked((P, P, P), mask)))  # linear in the gradient
    return sigs + [Sig((B, B, B), _masked((B, B, B), mask))]


def _expected_locals(ctx: LocalContext) -> list[tuple[int, ...] | None]:
    return [
        None if s is None else local_shape(s, sbp, ctx.mesh.shape, ctx.coord)
        for s, sbp in zip([s for s in ctx.out_shapes if s is not None], ctx.outs)
    ]


@local(aten.convolution.default, aten.convolution_backward.default)
def _conv_local(ctx: LocalContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A channel split may leave a shard with no channels, where the kernels refuse, return no output
    channels (forward) or a zero bias gradient (backward): its share is zeros of the expected shapes, and
    the bias gradient, which needs no input channel, is the sum of the gradient."""
    forward = ctx.call.func == aten.convolution.default
    x, weight = (args[0], args[1]) if forward else (args[1], args[2])
    if x.shape[1] and weight.shape[0] and weight.shape[1]:
        return ctx.call.func(*args, **kwargs)
    want = iter(_expected_locals(ctx))
    if forward:
        shape = next(want)
        assert shape is not None
        return x.new_zeros(shape)
    mask = _arg(ctx.call, 10)
    out = [x.new_zeros(next(want)) if m else None for m in mask]
    if mask[2]:
        dy = args[0]
        out[2] = dy.sum([d for d in range(dy.ndim) if d != 1])
    return tuple(out)


# -- pooling ------------------------------------------------------------------------------------------------


def _planes(call: OpCall, i: int = 0) -> range:
    """Dims that pooling treats independently: all but the last two (spatial) ones."""
    return range(call.tensors[i].ndim - 2)


@rule(aten.max_pool2d_with_indices.default)
def _max_pool(call: OpCall, k: int) -> list[Sig]:
    return [Sig((S(d),), (S(d), S(d))) for d in _planes(call)] + [Sig((B,), (B, B))]


@rule(aten.max_pool2d_with_indices_backward.default)
def _max_pool_backward(call: OpCall, k: int) -> list[Sig]:
    # (grad_output, self, kernel_size, stride, padding, dilation, ceil_mode, indices)
    sigs = [Sig((S(d), S(d), S(d)), (S(d),)) for d in _planes(call)]
    return sigs + [Sig((P, B, B), (P,)), Sig((B, B, B), (B,))]


@rule(aten.avg_pool2d.default, aten._adaptive_avg_pool2d.default)
def _avg_pool(call: OpCall, k: int) -> list[Sig]:
    return [Sig((S(d),), (S(d),)) for d in _planes(call)] + [Sig((P,), (P,)), Sig((B,), (B,))]


@rule(aten.avg_pool2d_backward.default, aten._adaptive_avg_pool2d_backward.default)
def _avg_pool_backward(call: OpCall, k: int) -> list[Sig]:
    sigs = [Sig((S(d), S(d)), (S(d),)) for d in _planes(call)]
    return sigs + [Sig((P, B), (P,)), Sig((P, P), (P,)), Sig((B, B), (B,))]


@local(
    aten.max_pool2d_with_indices.default,
    aten.max_pool2d_with_indices_backward.default,
    aten.avg_pool2d.default,
    aten.avg_pool2d_backward.default,
    aten._adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool2d_backward.default,
)
def _pool_local(ctx: LocalContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The pooling kernels refuse an empty plane dim (a split of fewer channels than ranks): nothing to do."""
    if all(a.numel() for a in args if isinstance(a, torch.Tensor)):
        return ctx.call.func(*args, **kwargs)
    shapes = _expected_locals(ctx)
    x = args[0]
    outs = [x.new_zeros(s) for s in shapes if s is not None]
    if ctx.call.func == aten.max_pool2d_with_indices.default:
        outs[1] = outs[1].long()
        return tuple(outs)
    return outs[0]
