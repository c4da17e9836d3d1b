"""Matmuls, convolutions and attention: the multiply-add work (``OpFlops.matmul``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from shardflow.ops.flops.registry import ADD, DIV, EXP, FORMULAS, Formula, OpFlops, arg, formula, numel

# -- matmuls, convolutions, attention ----------------------------------------------------------------------


@formula("mm", "_scaled_mm")
def _mm(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``(m, k) @ (k, n)``: ``m n k`` multiply-adds (``_scaled_mm``, fp8 with scales: the same; its scaling
    and bias not counted)."""
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


@formula("_grouped_mm")
def _grouped_mm(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """A mixture of experts' matmuls: tokens ``(t, k)`` each by its group's ``(k, n)`` of ``(g, k, n)``, or
    ``(g, m, k) @ (g, k, n)``, or ``(m, k) @ (k, n)`` split along ``k`` (or ``(g, m, k) @ (k, n)`` along ``n``)
    by groups: one product's worth each."""
    a, b = args[0].shape, args[1].shape
    if len(a) == 2 and len(b) == 3:
        return OpFlops(matmul=2 * a[0] * a[1] * b[2])
    if len(a) == 3 and len(b) == 3:
        return OpFlops(matmul=2 * a[0] * a[1] * a[2] * b[2])
    if len(a) == 2 and len(b) == 2:
        return OpFlops(matmul=2 * a[0] * a[1] * b[1])
    if len(a) == 3 and len(b) == 2:  # (g, m, k) @ (k, n) split along n by groups: a 2-d by 2-d's backward
        return OpFlops(matmul=2 * a[1] * a[2] * b[1])
    raise ValueError(f"_grouped_mm of shapes {a} and {b}: no formula")


@formula("addbmm")
def _addbmm(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """``bias + sum_i a_i @ b_i``: the batch's products, summed (their adds are the multiply-adds'), and an
    add per result for the bias."""
    (b, m, k), n = args[1].shape, args[2].shape[2]
    return OpFlops(matmul=2 * b * m * n * k, vector=ADD * m * n)


@formula("mv", "addmv")
def _mv(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """A matrix-vector product (``addmv``: and an add per result)."""
    matrix = args[0] if len(args[0].shape) == 2 else args[1]
    bias = ADD * numel(outs[0]) if len(args[0].shape) != 2 else 0
    return OpFlops(matmul=2 * numel(matrix), vector=bias)


@formula("dot", "vdot")
def _dot(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    return OpFlops(matmul=2 * numel(args[0]))


def conv_macs(x: Any, weight: Any, out: Any, transposed: bool) -> int:
    """Multiply-adds of a convolution: each weight element meets every position of the batch's smaller side
    (the output's positions; a transposed convolution's input positions) once. ``weight`` holds one group's
    channels, so groups need no factor of their own."""
    positions = (x if transposed else out).shape[2:]
    return x.shape[0] * math.prod(weight.shape) * math.prod(positions)


@formula("convolution", "_convolution")
def _convolution(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """The convolution's multiply-adds (``conv_macs``), and the bias's add per result."""
    x, weight, bias = args[0], args[1], arg(args, kwargs, 2, "bias")
    transposed = bool(arg(args, kwargs, 6, "transposed", False))
    out = outs[0]
    return OpFlops(matmul=2 * conv_macs(x, weight, out, transposed), vector=ADD * numel(out) if bias is not None else 0)


@formula("convolution_backward")
def _convolution_backward(args: Sequence[Any], kwargs: dict[str, Any], outs: Sequence[Any]) -> OpFlops:
    """The input's gradient and the weight's gradient each repeat every multiply-add of the forward once
    (each is a convolution of the output's gradient with the other operand); the bias's gradient sums the
    output's gradient. ``output_mask`` says which are computed."""
    grad, x, weight = args[0], args[1], args[2]
    transposed, mask = bool(args[7]), args[10]
    macs = conv_macs(x, weight, grad, transposed)
    return OpFlops(matmul=2 * macs * (int(mask[0]) + int(mask[1])), vector=ADD * numel(grad) if mask[2] else 0)


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
        mask = arg(args, kwargs, mask_at, "attn_mask") if mask_at is not None else None
        masked = bool(arg(args, kwargs, causal_at, "is_causal", False)) or mask is not None
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
