"""Element-wise ops with broadcasting: a split of an output dim is the same split of every input that
has that dim (with size > 1); ``P`` passes through only ops linear in it."""

from __future__ import annotations

import torch

from shardflow.ops.registry import B, OpCall, P, S, Sig, TensorMeta, rule

aten = torch.ops.aten


def _out_ndim(call: OpCall) -> int:
    return max(t.ndim for t in call.tensors)


def split_sigs(call: OpCall) -> list[Sig]:
    """One signature per output dim: inputs broadcast along it stay ``B``."""
    nd = _out_ndim(call)
    out_shape = [1] * nd
    for t in call.tensors:
        for i, n in enumerate(t.shape):
            j = nd - t.ndim + i
            out_shape[j] = max(out_shape[j], n)
    sigs = []
    for d in range(nd):
        ins = []
        for t in call.tensors:
            i = d - (nd - t.ndim)
            ins.append(S(i) if i >= 0 and t.shape[i] == out_shape[d] and out_shape[d] > 1 else B)
        if any(p != B for p in ins):
            sigs.append(Sig(tuple(ins), (S(d),)))
    return sigs


NONLINEAR = [
    aten.relu.default, aten.gelu.default, aten.tanh.default, aten.sigmoid.default, aten.exp.default,
    aten.log.default, aten.sqrt.default, aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor,
    aten.threshold_backward.default, aten.gelu_backward.default, aten.tanh_backward.default,
    aten.sigmoid_backward.default, aten.eq.Tensor, aten.eq.Scalar, aten.ne.Scalar, aten.ne.Tensor, aten.gt.Scalar,
    aten.lt.Scalar, aten.ge.Scalar, aten.le.Scalar, aten.gt.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.le.Tensor,
    aten.where.self,
    aten.masked_fill.Scalar, aten.abs.default, aten.sign.default, aten.silu.default, aten.silu_backward.default,
    aten.maximum.default, aten.minimum.default, aten.clamp.default, aten.reciprocal.default, aten.sin.default,
    aten.cos.default, aten.logical_not.default, aten.bitwise_not.default,
    aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar, aten.add_.Scalar, aten.sub_.Scalar,
    aten.lerp.Scalar, aten.lerp_.Scalar, aten.addcmul.default, aten.addcmul_.default, aten.addcdiv.default,
    aten.addcdiv_.default, aten.sqrt_.default, aten.clamp_.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.maximum.default, aten.copysign.Tensor, aten.isfinite.default, aten.isinf.default, aten.isnan.default,
    aten.logical_and.default, aten.logical_or.default, aten.sign_.default, aten.exp_.default,
    aten.round.default, aten.round.decimals, aten.floor.default, aten.ceil.default, aten.trunc.default,
    aten.frac.default, aten.remainder.Scalar, aten.remainder.Tensor, aten.fmod.Scalar, aten.sgn.default, aten.log1p.default, aten.expm1.default, aten.softplus.default, aten.softplus_backward.default,
]  # fmt: skip


@rule(*NONLINEAR)
def _nonlinear(call: OpCall, k: int) -> list[Sig]:
    return split_sigs(call) + [Sig((B,) * len(call.tensors), (B,))]


@rule(aten.add.Tensor, aten.sub.Tensor, aten.add_.Tensor, aten.sub_.Tensor)
def _add(call: OpCall, k: int) -> list[Sig]:
    n = len(call.tensors)
    sigs = split_sigs(call)
    # a sum of partials is partial; a plain-number operand would be added once per rank, so P needs both
    # operands to be GlobalTensors of the same shape
    if n == 2 and call.tensors[0].shape == call.tensors[1].shape:
        sigs.append(Sig((P, P), (P,)))
    return sigs + [Sig((B,) * n, (B,))]


@rule(aten.mul.Tensor, aten.mul_.Tensor, aten.div.Tensor, aten.div_.Tensor)
def _mul(call: OpCall, k: int) -> list[Sig]:
    n = len(call.tensors)
    sigs = split_sigs(call)
    if n == 1 and isinstance(call.args[0], TensorMeta):
        sigs.append(Sig((P,), (P,)))  # a GlobalTensor times (or over) a number: linear
    else:
        sigs.append(Sig((P, B), (P,)))  # linear in the first operand
        if call.func in (aten.mul.Tensor,):
            sigs.append(Sig((B, P), (P,)))
    return sigs + [Sig((B,) * n, (B,))]


@rule(aten.mul.Scalar, aten.div.Scalar, aten.mul_.Scalar, aten.div_.Scalar, aten.neg.default, aten.zero_.default)
def _scale(call: OpCall, k: int) -> list[Sig]:
    return split_sigs(call) + [Sig((P,), (P,)), Sig((B,), (B,))]
