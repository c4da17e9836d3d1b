"""Reductions and the fused ops built on them: softmax, losses, normalisation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from shardflow.ops.flops.registry import (
    ADD,
    DIV,
    EXP,
    FORMULAS,
    Formula,
    OpFlops,
    arg,
    formula,
    numel,
    per_element,
)


def _rows(x: Any, dim: int) -> tuple[int, int]:
    """(elements, rows) of ``x`` reduced along ``dim``: a row is one reduction's elements."""
    n = numel(x)
    size = x.shape[dim] if len(x.shape) else 1
    return n, (n // size if size else 0)


@formula("_softmax", "_safe_softmax")
def _softmax(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Per element: the row's max (a compare), a subtract, an exp, the row's sum (an add), a divide."""
    n, _ = _rows(args[0], args[1])
    return OpFlops(vector=(3 * ADD + EXP + DIV) * n)


@formula("_softmax_backward_data")
def _softmax_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``y * (g - sum(g * y))``: per element a multiply, an add to the row's sum, a subtract, a multiply."""
    return OpFlops(vector=4 * ADD * numel(args[0]))


@formula("_log_softmax")
def _log_softmax(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Per element: the row's max, a subtract, an exp, the row's sum, a subtract; per row a log."""
    n, rows = _rows(args[0], args[1])
    return OpFlops(vector=(4 * ADD + EXP) * n + EXP * rows)


@formula("_log_softmax_backward_data")
def _log_softmax_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``g - exp(y) * sum(g)``: per element an add to the row's sum, an exp, a multiply, a subtract."""
    return OpFlops(vector=(3 * ADD + EXP) * numel(args[0]))


def _loss(per_element: int) -> Formula:
    """A pointwise loss of ``per_element`` FLOPs an element, summed (an add each) and, for a mean, divided once."""

    def count(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
        found = (a for a in args[2:] if isinstance(a, int) and not isinstance(a, bool))
        reduction = next(found, kwargs.get("reduction", 1))
        n = numel(args[0])
        return OpFlops(vector=(per_element + (ADD if reduction else 0)) * n + (DIV if reduction == 1 else 0))

    return count


FORMULAS["mse_loss"] = _loss(2 * ADD)  # (x - y) ** 2
FORMULAS["l1_loss"] = _loss(2 * ADD)  # |x - y|
# (1 - y) * x + log(1 + exp(-x)), weights not counted: a subtract, two multiplies, an exp, an add, a log
FORMULAS["binary_cross_entropy_with_logits"] = _loss(4 * ADD + 2 * EXP)
# -(y log p + (1 - y) log(1 - p)): two logs, two subtracts, two multiplies, an add
FORMULAS["binary_cross_entropy"] = _loss(5 * ADD + 2 * EXP)
# |d| < beta ? 0.5 d * d / beta : |d| - 0.5 beta, with d = x - y; Huber: 0.5 d * d or delta (|d| - 0.5 delta)
FORMULAS["smooth_l1_loss"] = _loss(7 * ADD + DIV)
FORMULAS["huber_loss"] = _loss(8 * ADD)
# the gradients, per element: 2 (x - y) g / n (Huber: clamped); g (p - y) / (p (1 - p)); clamp(d / beta) g / n
per_element(3 * ADD, "mse_loss_backward", "huber_loss_backward")
per_element(4 * ADD + DIV, "binary_cross_entropy_backward", "smooth_l1_loss_backward")


@formula("logsumexp")
def _logsumexp(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Per element: a max, a subtract, an exp, an add; per result a log and an add."""
    return OpFlops(vector=(3 * ADD + EXP) * numel(args[0]) + (EXP + ADD) * numel(outs[0]))


@formula("nll_loss_forward", "nll_loss2d_forward")
def _nll_loss(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """The picked log-probabilities summed (one add per target; a multiply each too when weighted) and, for
    a mean, one divide."""
    targets, weight, reduction = numel(args[1]), arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "reduction", 1)
    return OpFlops(vector=(2 if weight is not None else 1) * targets + (DIV if reduction == 1 else 0))


@formula("nll_loss_backward", "nll_loss2d_backward")
def _nll_loss_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``-g / total`` written at each target's place: a divide once, then a multiply per target."""
    return OpFlops(vector=DIV + numel(args[2]))


def _norm_flops(elements: int, groups: int, affine: int) -> int:
    """A normalisation of ``elements`` in ``groups``: per element the mean's add, the variance's subtract,
    square and add, the normalisation's subtract and multiply, and ``affine`` (1 weight, 2 weight and bias);
    per group the mean's and the variance's divides, the epsilon's add and a reciprocal square root."""
    return (6 * ADD + affine) * elements + (3 * DIV + ADD) * groups


def _norm_backward_flops(elements: int, groups: int, has_weight: bool, mask: Sequence[bool]) -> int:
    """The normalisation's backward, each part where ``mask`` asks for it. Per element: the normalised input
    again (2, for the input's or the weight's gradient); the input's gradient
    ``rstd * (gw - mean(gw) - xhat * mean(gw * xhat))`` with ``gw = g * w`` (1 with a weight), the two sums
    (3: an add, a multiply and an add) and the rest (4), and per group two divides; the weight's gradient
    ``sum(g * xhat)`` (2); the bias's ``sum(g)`` (1)."""
    per_element = 2 * ADD if mask[0] or mask[1] else 0
    per_element += (7 * ADD + (ADD if has_weight else 0)) if mask[0] else 0
    per_element += (2 * ADD if mask[1] else 0) + (ADD if mask[2] else 0)
    return per_element * elements + (2 * DIV * groups if mask[0] else 0)


@formula("native_layer_norm")
def _layer_norm(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Mean and variance over the normalised dims of each row, then normalised (``_norm_flops``)."""
    x, shape, weight, bias = args[0], args[1], args[2], args[3]
    n = numel(x)
    groups = n // math.prod(shape) if math.prod(shape) else 0
    return OpFlops(vector=_norm_flops(n, groups, (weight is not None) + (bias is not None)))


@formula("native_layer_norm_backward")
def _layer_norm_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``_norm_backward_flops`` per row of the normalised dims."""
    x, shape, weight, mask = args[1], args[2], args[5], args[7]
    n = numel(x)
    groups = n // math.prod(shape) if math.prod(shape) else 0
    return OpFlops(vector=_norm_backward_flops(n, groups, weight is not None, mask))


@formula("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional")
def _batch_norm(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Training: statistics per channel (``_norm_flops``), and the running mean and variance each moved by
    a multiply-add per channel (4); evaluation: the normalisation and affine map with the running statistics
    (2 + affine per element, an add and a reciprocal square root per channel)."""
    x, weight, bias = args[0], args[1], args[2]
    training = next((a for a in args[3:] if isinstance(a, bool)), True)
    n, channels = numel(x), (x.shape[1] if len(x.shape) > 1 else 1)
    affine = (weight is not None) + (bias is not None)
    if not training:
        return OpFlops(vector=(2 * ADD + affine) * n + (ADD + DIV) * channels)
    running = len(args) > 3 and hasattr(args[3], "shape")  # ``no_stats`` overloads have the flag there instead
    return OpFlops(vector=_norm_flops(n, channels, affine) + (4 * ADD * channels if running else 0))


@formula("_native_batch_norm_legit_no_training")
def _batch_norm_eval(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Evaluation batch norm (see ``_batch_norm``)."""
    x, weight, bias = args[0], args[1], args[2]
    affine = (weight is not None) + (bias is not None)
    return OpFlops(vector=(2 * ADD + affine) * numel(x) + (ADD + DIV) * x.shape[1])


@formula("native_batch_norm_backward")
def _batch_norm_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``_norm_backward_flops`` per channel."""
    x, weight, mask = args[1], args[2], args[-1]
    return OpFlops(vector=_norm_backward_flops(numel(x), x.shape[1], weight is not None, mask))


@formula("sum", "prod", "amax", "amin", "max", "min", "argmax", "argmin", "any", "all", "cumsum", "cumprod")
def _reduce(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """One add (or compare, or multiply) per input element."""
    return OpFlops(vector=ADD * numel(args[0]))


@formula("mean")
def _mean(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """The sum, then a divide per result."""
    return OpFlops(vector=ADD * numel(args[0]) + DIV * numel(outs[0]))


@formula("var", "var_mean")
def _var(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """The mean (an add per element, a divide per result), then a subtract, a square and an add per element
    and a divide per result."""
    return OpFlops(vector=4 * ADD * numel(args[0]) + 2 * DIV * numel(outs[0]))


@formula("std", "std_mean")
def _std(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """The variance, and a square root per result."""
    return OpFlops(vector=4 * ADD * numel(args[0]) + 3 * DIV * numel(outs[0]))


@formula("native_group_norm")
def _group_norm(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``native_group_norm(x, w, b, N, C, HxW, group, eps)``: statistics per sample and group (``_norm_flops``)."""
    x, weight, bias, batch, groups = args[0], args[1], args[2], args[3], args[6]
    return OpFlops(vector=_norm_flops(numel(x), batch * groups, (weight is not None) + (bias is not None)))


@formula("native_group_norm_backward")
def _group_norm_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``native_group_norm_backward(g, x, mean, rstd, w, N, C, HxW, group, mask)``: ``_norm_backward_flops``."""
    x, weight, batch, groups, mask = args[1], args[4], args[5], args[8], args[9]
    return OpFlops(vector=_norm_backward_flops(numel(x), batch * groups, weight is not None, mask))


@formula("linalg_vector_norm", "norm")
def _norm(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """A multiply-add per element (the sum of squares), a square root per result."""
    return OpFlops(vector=2 * ADD * numel(args[0]) + DIV * numel(outs[0]))
