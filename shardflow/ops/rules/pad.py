"""Padding and gathering along one dim: other dims keep their split."""

from __future__ import annotations

import torch

from shardflow.ops.registry import B, OpCall, S, Sig, rule

aten = torch.ops.aten


@rule(aten.constant_pad_nd.default)
def _pad(call: OpCall, k: int) -> list[Sig]:
    x = call.tensors[0]
    pad = list(call.args[1])
    padded = {x.ndim - 1 - i // 2 for i, n in enumerate(pad) if n != 0}
    return [Sig((S(d),), (S(d),)) for d in range(x.ndim) if d not in padded] + [Sig((B,), (B,))]


@rule(aten.gather.default)
def _gather(call: OpCall, k: int) -> list[Sig]:
    x, index = call.tensors[0], call.tensors[1]
    dim = call.args[1] % max(x.ndim, 1)
    same = [d for d in range(x.ndim) if d != dim and x.shape[d] == index.shape[d]]
    return [Sig((S(d), S(d)), (S(d),)) for d in same] + [Sig((B, B), (B,))]
