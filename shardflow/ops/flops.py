"""FLOPs of one ATen op from its shapes: shardflow's own formulas, one per op, in one registry.

The convention, written once so that every count can be checked by hand:

=================================================  =====================================================
work                                               FLOPs
=================================================  =====================================================
a multiply-add (matmuls, convolutions, attention)  2
add, subtract, multiply, compare, select, max      1 per element
divide, square root, reciprocal                    4 per element
exp, log, erf, tanh, sine (transcendentals)        8 per element
a reduction over ``n`` elements                    ``n`` (one add or compare per element)
moving data (views, copies, gathers, factories)    0
=================================================  =====================================================

Fused ops are counted as the steps they compute, each by the table (``native_layer_norm`` is a mean, a
variance, a reciprocal square root, a normalisation and the affine map); each formula's docstring lists
them. These are AIPerf's per-op costs. Attention kernels count the full score square even when causal (as
``torch.utils.flop_counter``, PaLM's MFU and nanoGPT do, so figures compare across systems), and their
backward's recomputation of the scores is hardware work, counted apart (``recompute``), not model work.
An op with no formula counts nothing and is listed by the caller, never guessed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch

ADD = 1
DIV = 4
EXP = 8
SIGMOID = EXP + ADD + DIV  # 1 / (1 + exp(-x))


class Shaped(Protocol):
    """A tensor argument as a formula sees it: a fake tensor or a ``TensorMeta``, global or local."""

    @property
    def shape(self) -> Any: ...


class OpFlops(NamedTuple):
    """One call's FLOPs: ``matmul`` (multiply-adds of matmuls, convolutions and attention products: what
    ``torch.utils.flop_counter`` counts), ``vector`` (everything else, by the module's convention) and
    ``recompute`` (hardware work redoing what the forward computed, as a fused attention backward does)."""

    matmul: int = 0
    vector: int = 0
    recompute: int = 0

    @property
    def total(self) -> int:
        """The op's model FLOPs (``recompute`` excluded)."""
        return self.matmul + self.vector


Formula = Callable[[Sequence[Any], dict[str, Any], Sequence[Any]], OpFlops]
FORMULAS: dict[str, Formula] = {}
FREE: set[str] = set()  # ops that only move or make data: 0 FLOPs, and known to be 0


def op_flops(func: Any, args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops | None:
    """FLOPs of ``func(*args, **kwargs)`` with results ``outs`` (tensors given as anything with a ``.shape``:
    global shapes give the logical op's work, one rank's local shapes that rank's); None when the op has no
    formula. ``func`` is an ATen ``OpOverload`` (``aten.mm.default``) or its name."""
    name = func if isinstance(func, str) else func.overloadpacket.__name__
    if name.endswith("_") and (name[:-1] in FORMULAS or name[:-1] in FREE):  # in place: as its functional form
        name = name[:-1]
    if name in FREE:
        return OpFlops()
    formula = FORMULAS.get(name)
    if formula is None:
        return None
    return formula(args, kwargs, [o for o in outs if o is not None])


def _numel(t: Any) -> int:
    return math.prod(t.shape) if t is not None and hasattr(t, "shape") else 0


def _arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def formula(*names: str) -> Callable[[Formula], Formula]:
    """Register a formula for the ATen ops ``names`` (overload packet names, in-place ``_`` forms included)."""

    def register(fn: Formula) -> Formula:
        for name in names:
            FORMULAS[name] = fn
        return fn

    return register


def per_element(cost: int, *names: str) -> None:
    """``names`` cost ``cost`` FLOPs per element of their (first) result."""

    def count(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
        return OpFlops(vector=cost * _numel(outs[0]) if outs else 0)

    for name in names:
        FORMULAS[name] = count


FREE.update(
    # views and data movement
    "alias as_strided cat clone contiguous copy detach expand flip gather index index_select lift_fresh_copy "
    "narrow permute repeat reshape select slice slice_scatter select_scatter split split_with_sizes squeeze "
    "stack t transpose unbind unfold unsqueeze view _unsafe_view _to_copy _reshape_alias constant_pad_nd "
    "embedding roll scatter masked_select nonzero sort topk to slice_backward select_backward "
    "index_select_backward unfold_backward diagonal_backward as_strided_scatter "
    # factories
    "arange empty empty_like empty_strided full full_like new_empty new_full new_ones new_zeros ones ones_like "
    "rand rand_like randn randn_like randint scalar_tensor zeros zeros_like fill lift bernoulli "
    # bookkeeping
    "_assert_async _assert_scalar sym_size sym_numel sym_stride".split()
)
per_element(ADD, "neg", "abs", "sign", "relu", "threshold_backward", "where", "masked_fill", "tril", "triu")
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


@formula("add")
def _add(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``x + alpha * y``: an add, and a multiply when ``alpha`` is not 1."""
    alpha = kwargs.get("alpha", 1)
    return OpFlops(vector=(ADD if alpha == 1 else 2 * ADD) * _numel(outs[0]))


@formula("pow")
def _pow(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``x ** k``: ``k - 1`` multiplies for a small whole ``k``, a square root (or its reciprocal) for
    ±0.5, a divide for -1, else ``exp(k * log(x))``."""
    k = _arg(args, kwargs, 1, "exponent")
    if isinstance(k, (int, float)) and float(k).is_integer() and 1 <= k <= 4:
        cost = int(k) - 1
    elif k in (0.5, -0.5, -1):
        cost = DIV
    else:
        cost = 2 * EXP + ADD
    return OpFlops(vector=cost * _numel(outs[0]))


@formula("gelu")
def _gelu(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Exact: ``x * 0.5 * (1 + erf(x * 2 ** -0.5))``, an erf and four adds or multiplies. ``tanh``:
    ``0.5 * x * (1 + tanh(c * (x + 0.044715 * x ** 3)))``, a tanh and seven adds or multiplies."""
    tanh = _arg(args, kwargs, 1, "approximate", "none") == "tanh"
    return OpFlops(vector=(EXP + (7 if tanh else 4) * ADD) * _numel(outs[0]))


@formula("gelu_backward")
def _gelu_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Exact: ``g * (cdf + x * pdf)``: the cdf (an erf, three adds or multiplies), the pdf
    ``exp(-x * x / 2) / sqrt(2 pi)`` (an exp, three multiplies), then three more. ``tanh``: its tanh, seven
    steps to the tanh's argument and value, and eight more for the derivative's terms."""
    tanh = _arg(args, kwargs, 2, "approximate", "none") == "tanh"
    return OpFlops(vector=((EXP + 15 * ADD) if tanh else (2 * EXP + 9 * ADD)) * _numel(outs[0]))


def _rows(x: Any, dim: int) -> tuple[int, int]:
    """(elements, rows) of ``x`` reduced along ``dim``: a row is one reduction's elements."""
    n = _numel(x)
    size = x.shape[dim] if len(x.shape) else 1
    return n, (n // size if size else 0)


@formula("_softmax")
def _softmax(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Per element: the row's max (a compare), a subtract, an exp, the row's sum (an add), a divide."""
    n, _ = _rows(args[0], args[1])
    return OpFlops(vector=(3 * ADD + EXP + DIV) * n)


@formula("_softmax_backward_data")
def _softmax_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``y * (g - sum(g * y))``: per element a multiply, an add to the row's sum, a subtract, a multiply."""
    return OpFlops(vector=4 * ADD * _numel(args[0]))


@formula("_log_softmax")
def _log_softmax(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Per element: the row's max, a subtract, an exp, the row's sum, a subtract; per row a log."""
    n, rows = _rows(args[0], args[1])
    return OpFlops(vector=(4 * ADD + EXP) * n + EXP * rows)


@formula("_log_softmax_backward_data")
def _log_softmax_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``g - exp(y) * sum(g)``: per element an add to the row's sum, an exp, a multiply, a subtract."""
    return OpFlops(vector=(3 * ADD + EXP) * _numel(args[0]))


def _loss(per_element: int) -> Formula:
    """A pointwise loss of ``per_element`` FLOPs an element, summed (an add each) and, for a mean, divided once."""

    def count(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
        reduction = next((a for a in args[2:] if isinstance(a, int) and not isinstance(a, bool)), 1)
        n = _numel(args[0])
        return OpFlops(vector=(per_element + (ADD if reduction else 0)) * n + (DIV if reduction == 1 else 0))

    return count


FORMULAS["mse_loss"] = _loss(2 * ADD)  # (x - y) ** 2
FORMULAS["l1_loss"] = _loss(2 * ADD)  # |x - y|
# (1 - y) * x + log(1 + exp(-x)), weights not counted: a subtract, two multiplies, an exp, an add, a log
FORMULAS["binary_cross_entropy_with_logits"] = _loss(4 * ADD + 2 * EXP)
# -(y log p + (1 - y) log(1 - p)): two logs, two subtracts, two multiplies, an add
FORMULAS["binary_cross_entropy"] = _loss(5 * ADD + 2 * EXP)
# the gradients, per element: 2 (x - y) g / n; sign(x - y) g / n; (sigmoid(x) - y) g / n; g (p - y) / (p (1 - p))
per_element(3 * ADD, "mse_loss_backward", "l1_loss_backward")
per_element(SIGMOID + 2 * ADD, "binary_cross_entropy_with_logits_backward")
per_element(4 * ADD + DIV, "binary_cross_entropy_backward")


@formula("logsumexp")
def _logsumexp(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Per element: a max, a subtract, an exp, an add; per result a log and an add."""
    return OpFlops(vector=(3 * ADD + EXP) * _numel(args[0]) + (EXP + ADD) * _numel(outs[0]))


@formula("nll_loss_forward", "nll_loss2d_forward")
def _nll_loss(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """The picked log-probabilities summed (one add per target; a multiply each too when weighted) and, for
    a mean, one divide."""
    targets, weight, reduction = _numel(args[1]), _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "reduction", 1)
    return OpFlops(vector=(2 if weight is not None else 1) * targets + (DIV if reduction == 1 else 0))


@formula("nll_loss_backward", "nll_loss2d_backward")
def _nll_loss_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``-g / total`` written at each target's place: a divide once, then a multiply per target."""
    return OpFlops(vector=DIV + _numel(args[2]))


def _norm_flops(elements: int, groups: int, affine: int) -> int:
    """A normalisation of ``elements`` in ``groups``: per element the mean's add, the variance's subtract,
    square and add, the normalisation's subtract and multiply, and ``affine`` (1 weight, 2 weight and bias);
    per group the mean's and the variance's divides, the epsilon's add and a reciprocal square root."""
    return (6 * ADD + affine) * elements + (3 * DIV + ADD) * groups


def _norm_backward_flops(elements: int, groups: int, has_weight: bool, mask: Sequence[bool]) -> int:
    """The normalisation's backward: per element the normalised input again (2), ``g * w`` (1 with a weight),
    the two sums (3: an add, a multiply and an add) and the input gradient
    ``rstd * (gw - mean(gw) - xhat * mean(gw * xhat))`` (4); per group two divides; the weight's gradient
    ``sum(g * xhat)`` (2 per element) and the bias's ``sum(g)`` (1) where asked for."""
    per_element = 9 * ADD + (ADD if has_weight else 0) + (2 * ADD if mask[1] else 0) + (ADD if mask[2] else 0)
    return per_element * elements + 2 * DIV * groups


@formula("native_layer_norm")
def _layer_norm(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Mean and variance over the normalised dims of each row, then normalised (``_norm_flops``)."""
    x, shape, weight, bias = args[0], args[1], args[2], args[3]
    n = _numel(x)
    groups = n // math.prod(shape) if math.prod(shape) else 0
    return OpFlops(vector=_norm_flops(n, groups, (weight is not None) + (bias is not None)))


@formula("native_layer_norm_backward")
def _layer_norm_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``_norm_backward_flops`` per row of the normalised dims."""
    x, shape, weight, mask = args[1], args[2], args[5], args[7]
    n = _numel(x)
    groups = n // math.prod(shape) if math.prod(shape) else 0
    return OpFlops(vector=_norm_backward_flops(n, groups, weight is not None, mask))


@formula("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional")
def _batch_norm(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Training: statistics per channel (``_norm_flops``), and the running mean and variance each moved by
    a multiply-add per channel (4); evaluation: the normalisation and affine map with the running statistics
    (2 + affine per element, an add and a reciprocal square root per channel)."""
    x, weight, bias = args[0], args[1], args[2]
    training = next((a for a in args[3:] if isinstance(a, bool)), True)
    n, channels = _numel(x), (x.shape[1] if len(x.shape) > 1 else 1)
    affine = (weight is not None) + (bias is not None)
    if not training:
        return OpFlops(vector=(2 * ADD + affine) * n + (ADD + DIV) * channels)
    running = args[3] is not None if len(args) > 3 else False
    return OpFlops(vector=_norm_flops(n, channels, affine) + (4 * ADD * channels if running else 0))


@formula("_native_batch_norm_legit_no_training")
def _batch_norm_eval(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Evaluation batch norm (see ``_batch_norm``)."""
    x, weight, bias = args[0], args[1], args[2]
    affine = (weight is not None) + (bias is not None)
    return OpFlops(vector=(2 * ADD + affine) * _numel(x) + (ADD + DIV) * x.shape[1])


@formula("native_batch_norm_backward")
def _batch_norm_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``_norm_backward_flops`` per channel."""
    x, weight, mask = args[1], args[2], args[-1]
    return OpFlops(vector=_norm_backward_flops(_numel(x), x.shape[1], weight is not None, mask))


@formula("sum", "prod", "amax", "amin", "max", "min", "argmax", "argmin", "any", "all", "cumsum", "cumprod")
def _reduce(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """One add (or compare, or multiply) per input element."""
    return OpFlops(vector=ADD * _numel(args[0]))


@formula("mean")
def _mean(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """The sum, then a divide per result."""
    return OpFlops(vector=ADD * _numel(args[0]) + DIV * _numel(outs[0]))


@formula("var", "std", "var_mean", "std_mean")
def _var(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """The mean (an add per element, a divide per result), then a subtract, a square and an add per element
    and a divide per result (std: and a square root)."""
    return OpFlops(vector=4 * ADD * _numel(args[0]) + 3 * DIV * _numel(outs[0]))


@formula("linalg_vector_norm", "norm")
def _norm(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """A multiply-add per element (the sum of squares), a square root per result."""
    return OpFlops(vector=2 * ADD * _numel(args[0]) + DIV * _numel(outs[0]))


@formula("native_dropout")
def _dropout(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """In training, per element: the random number compared with ``p``, then ``x * mask * scale``
    (drawing the random numbers is not counted); in evaluation nothing."""
    train = _arg(args, kwargs, 2, "train", True)
    return OpFlops(vector=3 * ADD * _numel(args[0]) if train is not False else 0)


@formula("native_dropout_backward")
def _dropout_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``g * mask * scale``."""
    return OpFlops(vector=2 * ADD * _numel(args[0]))


@formula("embedding_dense_backward")
def _embedding_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each looked-up row's gradient added into its row: an add per element of the gradient."""
    return OpFlops(vector=ADD * _numel(args[0]))


@formula("scatter_add", "index_add")
def _scatter_add(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """An add per element of the source (``scatter_add(x, dim, index, src)``, ``index_add(x, dim, index, src)``)."""
    return OpFlops(vector=ADD * _numel(_arg(args, kwargs, 3, "src", kwargs.get("source"))))


@formula("index_put")
def _index_put(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """A copy, or with ``accumulate`` an add per element of the values."""
    return OpFlops(vector=ADD * _numel(args[2]) if _arg(args, kwargs, 3, "accumulate", False) else 0)


@formula("_embedding_bag", "_embedding_bag_forward_only", "embedding_bag")
def _embedding_bag(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each looked-up row pooled into its bag: an add (sum, or max's compare) per element, a multiply more
    with per-sample weights; a mean divides each bag's result."""
    weight, ids = args[0], args[1]
    mode = _arg(args, kwargs, 4, "mode", 0)
    weighted = _arg(args, kwargs, 6, "per_sample_weights") is not None
    rows = _numel(ids) * weight.shape[1]
    mean = DIV * _numel(outs[0]) if mode == 1 and outs else 0
    return OpFlops(vector=(2 if weighted else 1) * ADD * rows + mean)


@formula("_embedding_bag_backward", "_embedding_bag_dense_backward", "_embedding_bag_sparse_backward")
def _embedding_bag_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each bag's gradient added to the rows it read: an add per looked-up element (a mean: a divide too)."""
    grad, ids = args[0], args[1]
    mode = next((a for a in args[6:9] if isinstance(a, int) and not isinstance(a, bool)), 0)
    return OpFlops(vector=(ADD + (DIV if mode == 1 else 0)) * _numel(ids) * grad.shape[-1])


@formula("max_pool2d_with_indices", "max_pool3d_with_indices", "max_pool1d", "max_pool2d")
def _max_pool(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """A compare per window element of each result."""
    return OpFlops(vector=ADD * _numel(outs[0]) * math.prod(args[1]))


@formula("max_pool2d_with_indices_backward", "max_pool3d_with_indices_backward")
def _max_pool_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each result's gradient added at its maximum's place."""
    return OpFlops(vector=ADD * _numel(args[0]))


@formula("avg_pool2d", "avg_pool3d")
def _avg_pool(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """An add per window element of each result, then a divide."""
    return OpFlops(vector=(ADD * math.prod(args[1]) + DIV) * _numel(outs[0]))


@formula("avg_pool2d_backward", "avg_pool3d_backward")
def _avg_pool_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each result's gradient divided, then added to every element of its window."""
    return OpFlops(vector=(DIV + ADD * math.prod(args[2])) * _numel(args[0]))


@formula("_adaptive_avg_pool2d", "_adaptive_avg_pool3d")
def _adaptive_avg_pool(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Every input element added into its window (windows tile the input), a divide per result."""
    return OpFlops(vector=ADD * _numel(args[0]) + DIV * _numel(outs[0]))


@formula("_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward")
def _adaptive_avg_pool_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Each result's gradient divided and spread over its window."""
    return OpFlops(vector=DIV * _numel(args[0]) + ADD * _numel(args[1]))


# -- matmuls, convolutions, attention ----------------------------------------------------------------------


@formula("mm")
def _mm(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``(m, k) @ (k, n)``: ``m n k`` multiply-adds."""
    (m, k), n = args[0].shape, args[1].shape[1]
    return OpFlops(matmul=2 * m * n * k)


@formula("addmm")
def _addmm(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``bias + a @ b``: the product's multiply-adds, and an add per result for the bias (scaling by
    ``beta``/``alpha`` not counted)."""
    (m, k), n = args[1].shape, args[2].shape[1]
    return OpFlops(matmul=2 * m * n * k, vector=ADD * m * n)


@formula("bmm")
def _bmm(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``(b, m, k) @ (b, k, n)``."""
    (b, m, k), n = args[0].shape, args[1].shape[2]
    return OpFlops(matmul=2 * b * m * n * k)


@formula("baddbmm")
def _baddbmm(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``bias + a @ b`` batched: the products, an add per result."""
    (b, m, k), n = args[1].shape, args[2].shape[2]
    return OpFlops(matmul=2 * b * m * n * k, vector=ADD * b * m * n)


@formula("mv", "addmv")
def _mv(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """A matrix-vector product (``addmv``: and an add per result)."""
    matrix = args[0] if len(args[0].shape) == 2 else args[1]
    bias = ADD * _numel(outs[0]) if len(args[0].shape) != 2 else 0
    return OpFlops(matmul=2 * _numel(matrix), vector=bias)


@formula("dot", "vdot")
def _dot(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    return OpFlops(matmul=2 * _numel(args[0]))


def conv_macs(x: Any, weight: Any, out: Any, transposed: bool) -> int:
    """Multiply-adds of a convolution: each weight element meets every position of the batch's smaller side
    (the output's positions; a transposed convolution's input positions) once. ``weight`` holds one group's
    channels, so groups need no factor of their own."""
    positions = (x if transposed else out).shape[2:]
    return x.shape[0] * math.prod(weight.shape) * math.prod(positions)


@formula("convolution", "_convolution", "conv2d", "conv1d", "conv3d")
def _convolution(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """The convolution's multiply-adds (``conv_macs``), and the bias's add per result."""
    x, weight, bias = args[0], args[1], _arg(args, kwargs, 2, "bias")
    transposed = bool(_arg(args, kwargs, 6, "transposed", False))
    out = outs[0]
    return OpFlops(
        matmul=2 * conv_macs(x, weight, out, transposed), vector=ADD * _numel(out) if bias is not None else 0
    )


@formula("convolution_backward")
def _convolution_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """The input's gradient and the weight's gradient each repeat every multiply-add of the forward once
    (each is a convolution of the output's gradient with the other operand); the bias's gradient sums the
    output's gradient. ``output_mask`` says which are computed."""
    grad, x, weight = args[0], args[1], args[2]
    transposed, mask = bool(args[7]), args[10]
    macs = conv_macs(x, weight, grad, transposed)
    return OpFlops(matmul=2 * macs * (int(mask[0]) + int(mask[1])), vector=ADD * _numel(grad) if mask[2] else 0)


def _attention_shapes(q: Any, k: Any, v: Any) -> tuple[int, int, int, int, int]:
    """(batch x query heads, query length, key length, query/key width, value width) of ``(b, h, s, d)``
    tensors; grouped-query kv heads are shared by their query heads, so the query's heads count."""
    *lead, sq, d = q.shape
    return math.prod(lead), sq, k.shape[-2], d, v.shape[-1]


# per score: the scale's multiply, the softmax (max, subtract, exp, sum, divide), and a mask's add
_SCORE_FORWARD = ADD + 3 * ADD + EXP + DIV
_SCORE_BACKWARD = 4 * ADD + ADD  # the softmax's backward (see ``_softmax_backward``) and the scale
_SCORE_RECOMPUTE = ADD + 2 * ADD + EXP  # the scale, and the probabilities again from the saved log-sum-exp


def _attention(causal_at: int, mask_at: int | None) -> Formula:
    """The forward kernel whose ``is_causal`` and mask (or bias) arguments are at these positions."""

    def count(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
        """``softmax(q k^T * scale + mask) v``: two products over the full score square (causal or not)
        and, per score, the scale, the softmax and, where there is a mask, its add."""
        bh, sq, sk, d, dv = _attention_shapes(args[0], args[1], args[2])
        scores = bh * sq * sk
        mask = _arg(args, kwargs, mask_at, "attn_mask") if mask_at is not None else None
        masked = bool(_arg(args, kwargs, causal_at, "is_causal", False)) or mask is not None
        return OpFlops(matmul=2 * scores * (d + dv), vector=(_SCORE_FORWARD + (ADD if masked else 0)) * scores)

    return count


# (is_causal, mask) argument positions of each fused attention kernel
for _name, _causal, _mask in (
    ("scaled_dot_product_attention", 5, 3),
    ("_scaled_dot_product_flash_attention", 4, None),
    ("_scaled_dot_product_flash_attention_for_cpu", 4, 5),
    ("_scaled_dot_product_efficient_attention", 6, 3),
    ("_scaled_dot_product_cudnn_attention", 6, 3),
):
    FORMULAS[_name] = _attention(_causal, _mask)


@formula(
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention_backward",
)
def _attention_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """Model work: four products (the probabilities' gradient ``g v^T``, ``dv = p^T g``, ``dq = ds k``,
    ``dk = ds^T q``) and the softmax's backward per score. The fused kernels keep only the log-sum-exp, so
    they first compute the scores and probabilities again: ``q k^T``, the scale and the exp, counted as
    ``recompute``."""
    bh, sq, sk, d, dv = _attention_shapes(args[1], args[2], args[3])
    scores = bh * sq * sk
    return OpFlops(
        matmul=2 * scores * (2 * dv + 2 * d),
        vector=_SCORE_BACKWARD * scores,
        recompute=2 * scores * d + _SCORE_RECOMPUTE * scores,
    )


def dtype_of(args: Sequence[Any]) -> torch.dtype | None:
    """The floating dtype of the first tensor argument that has one (what the op computes in)."""
    for a in args:
        dtype = getattr(a, "dtype", None)
        if dtype is not None and dtype.is_floating_point:
            return dtype
    return None
