"""Matrix products: Megatron's column (``B, S(1) -> S(1)``) and row (``S(1), S(0) -> P``) splits, data
parallel (``S(0), B -> S(0)``), and ``P`` through either operand (linear)."""

from __future__ import annotations

import torch

from shardflow.ops.registry import B, OpCall, P, S, Sig, rule
from shardflow.placement.sbp import Placement

aten = torch.ops.aten


def mm_sigs(batch: int = 0) -> list[Sig]:
    """Signatures of ``a @ b`` with ``batch`` leading batch dims on both (and the output)."""
    m, kd, n = batch, batch + 1, batch + 1  # a: (.., m, k), b: (.., k, n), out: (.., m, n)
    sigs = [Sig((S(d), S(d)), (S(d),)) for d in range(batch)]
    sigs += [
        Sig((S(m), B), (S(m),)),
        Sig((B, S(n)), (S(n),)),
        Sig((S(kd), S(batch)), (P,)),
        Sig((P, B), (P,)),
        Sig((B, P), (P,)),
        Sig((B, B), (B,)),
    ]
    return sigs


@rule(aten.mm.default)
def _mm(call: OpCall, k: int) -> list[Sig]:
    return mm_sigs()


@rule(aten.bmm.default)
def _bmm(call: OpCall, k: int) -> list[Sig]:
    return mm_sigs(batch=1)


@rule(aten.addmm.default)
def _addmm(call: OpCall, k: int) -> list[Sig]:
    """``bias + a @ b``: the bias follows the output's split of its last dim, and must be ``P`` with it."""
    bias = call.tensors[0]
    out = []
    for sig in mm_sigs():
        o = sig.outs[0]
        b: Placement
        if o == P:
            b = P
        elif isinstance(o, S):
            # bias broadcasts over rows (1-d or (1, n)); it is split only where it has the dim
            col = o.dim == 1
            if bias.ndim == 1:
                b = S(0) if col else B
            else:
                b = S(o.dim) if bias.shape[o.dim] > 1 else B
        else:
            b = B
        out.append(Sig((b, *sig.ins), sig.outs))
    return out
