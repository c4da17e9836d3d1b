"""Element-wise ops, activations and dropout: a cost per element of the result."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shardflow.ops.flops.registry import (
    ADD,
    DIV,
    EXP,
    FREE,
    SIGMOID,
    OpFlops,
    arg,
    formula,
    numel,
    per_element,
)

FREE.update(
    # views and data movement
    "alias as_strided cat clone contiguous copy detach expand flip gather index index_select lift_fresh_copy "
    "narrow permute repeat reshape select slice slice_scatter select_scatter split split_with_sizes squeeze "
    "stack t transpose unbind unfold unsqueeze view _unsafe_view _to_copy _reshape_alias constant_pad_nd "
    "embedding roll scatter masked_select nonzero sort topk to slice_backward select_backward "
    "index_select_backward unfold_backward diagonal_backward as_strided_scatter pixel_shuffle pixel_unshuffle "
    "repeat_interleave _unsafe_index upsample_nearest1d upsample_nearest2d upsample_nearest3d view_as_complex view_as_real tril_indices triu_indices "
    # factories
    "arange empty empty_like empty_strided full full_like new_empty new_full new_ones new_zeros ones ones_like "
    "rand rand_like randn randn_like randint scalar_tensor zeros zeros_like fill lift bernoulli "
    # bookkeeping
    "_assert_async _assert_scalar sym_size sym_numel sym_stride".split()
)
per_element(ADD, "neg", "abs", "sign", "sgn", "relu", "threshold_backward", "where", "masked_fill", "tril", "triu")
per_element(ADD, "eq", "ne", "lt", "le", "gt", "ge", "maximum", "minimum", "clamp", "clamp_min", "clamp_max")
per_element(ADD, "logical_and", "logical_or", "logical_not", "bitwise_and", "bitwise_or", "bitwise_not")
per_element(ADD, "sub", "rsub", "mul", "hardtanh", "hardtanh_backward", "leaky_relu", "leaky_relu_backward")
per_element(DIV, "div", "sqrt", "rsqrt", "reciprocal")
per_element(EXP, "exp", "exp2", "log", "log2", "log1p", "expm1", "erf", "tanh", "sin", "cos")
per_element(SIGMOID, "sigmoid")
# y = sigmoid(x): g * y * (1 - y); tanh: g * (1 - y * y)
per_element(3 * ADD, "sigmoid_backward", "tanh_backward")
per_element(SIGMOID + ADD, "silu")  # x * sigmoid(x)
# s = sigmoid(x); g * s * (1 + x * (1 - s)): a subtract, three multiplies and an add beside the sigmoid
per_element(SIGMOID + 5 * ADD, "silu_backward")
per_element(2 * ADD, "lerp", "addcmul")  # a multiply-add each (addcmul's scalar value: taken as 1)
per_element(DIV + ADD, "addcdiv")
# x * relu6(x + 3) / 6 and relu6(x + 3) / 6: an add, two compares, a multiply (and one more)
per_element(4 * ADD, "hardsigmoid", "hardsigmoid_backward")
per_element(5 * ADD, "hardswish", "hardswish_backward")
# x > 0 ? x : alpha * (exp(x) - 1): a compare, an exp, a subtract and a multiply; backward: a compare, two multiplies
per_element(EXP + 3 * ADD, "elu")
per_element(3 * ADD, "elu_backward", "_prelu_kernel")  # prelu: a compare, a multiply, a select
per_element(4 * ADD, "_prelu_kernel_backward")
# log(1 + exp(beta * x)) / beta: two multiplies, an exp, an add, a log, a compare (the threshold)
per_element(2 * EXP + 4 * ADD, "softplus", "log_sigmoid_forward")
per_element(SIGMOID + 2 * ADD, "softplus_backward", "log_sigmoid_backward")  # g * sigmoid(beta * x)
# x * tanh(softplus(x)); backward: the softplus, tanh and sigmoid again and six adds or multiplies
per_element(3 * EXP + 5 * ADD, "mish")
per_element(4 * EXP + ADD + DIV + 6 * ADD, "mish_backward")
per_element(EXP + 2 * ADD, "xlogy")  # x * log(y), a compare for x == 0 (a select)


@formula("add")
def _add(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``x + alpha * y``: an add, and a multiply when ``alpha`` is not 1 (keyword-only but for ``add.Scalar``)."""
    alpha = arg(args, kwargs, 2, "alpha", 1)
    return OpFlops(vector=(ADD if alpha == 1 else 2 * ADD) * numel(outs[0]))


@formula("pow")
def _pow(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``x ** k``: ``k - 1`` multiplies for a small whole ``k``, a square root (or its reciprocal) for
    ±0.5, a divide for -1, else ``exp(k * log(x))``."""
    k = arg(args, kwargs, 1, "exponent")  # a tensor for pow.Tensor_Tensor, and the base for pow.Scalar
    if not isinstance(k, (int, float)) or isinstance(args[0], (int, float)):
        cost = 2 * EXP + ADD
    elif k == 0:  # a fill
        cost = 0
    elif float(k).is_integer() and 1 <= k <= 4:
        cost = int(k) - 1
    elif k in (0.5, -0.5, -1):
        cost = DIV
    else:
        cost = 2 * EXP + ADD
    return OpFlops(vector=cost * numel(outs[0]))


@formula("gelu")
def _gelu(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Exact: ``x * 0.5 * (1 + erf(x * 2 ** -0.5))``, an erf and four adds or multiplies. ``tanh``:
    ``0.5 * x * (1 + tanh(c * (x + 0.044715 * x ** 3)))``, a tanh and seven adds or multiplies."""
    tanh = arg(args, kwargs, 1, "approximate", "none") == "tanh"
    return OpFlops(vector=(EXP + (7 if tanh else 4) * ADD) * numel(outs[0]))


@formula("gelu_backward")
def _gelu_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Exact: ``g * (cdf + x * pdf)``: the cdf (an erf, three adds or multiplies), the pdf
    ``exp(-x * x / 2) / sqrt(2 pi)`` (an exp, three multiplies), then three more. ``tanh``: its tanh, seven
    steps to the tanh's argument and value, and eight more for the derivative's terms."""
    tanh = arg(args, kwargs, 2, "approximate", "none") == "tanh"
    return OpFlops(vector=((EXP + 15 * ADD) if tanh else (2 * EXP + 9 * ADD)) * numel(outs[0]))


@formula("native_dropout")
def _dropout(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """In training, per element: the random number compared with ``p``, then ``x * mask * scale``
    (drawing the random numbers is not counted); in evaluation nothing."""
    train = arg(args, kwargs, 2, "train", True)
    return OpFlops(vector=3 * ADD * numel(args[0]) if train is not False else 0)


@formula("native_dropout_backward")
def _dropout_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``g * mask * scale``."""
    return OpFlops(vector=2 * ADD * numel(args[0]))


@formula("glu")
def _glu(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``a * sigmoid(b)`` over the two halves: a sigmoid and a multiply per result."""
    return OpFlops(vector=(SIGMOID + ADD) * numel(outs[0]))


@formula("glu_backward")
def _glu_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Per half-element: the sigmoid again, ``g * s`` for ``a`` and ``g * a * s * (1 - s)`` for ``b``."""
    return OpFlops(vector=(SIGMOID + 4 * ADD) * numel(args[0]))
