"""Ops that keep the layout: aliases, copies, casts, ``*_like`` factories, ``copy_``."""

from __future__ import annotations

import torch

from shardflow.ops.registry import B, OpCall, P, S, Sig, rule

aten = torch.ops.aten


def keep_layout(call: OpCall, k: int, partial_ok: bool = True) -> list[Sig]:
    """Output in the (single) input's layout: every split, ``P`` where allowed, ``B``."""
    sigs = [Sig((S(d),), (S(d),)) for d in range(call.tensors[0].ndim)]
    if partial_ok:
        sigs.append(Sig((P,), (P,)))
    return sigs + [Sig((B,), (B,))]


@rule(
    aten.detach.default,
    aten.alias.default,
    aten.clone.default,
    aten._to_copy.default,
    aten.lift_fresh.default,
    aten.lift_fresh_copy.default,
)
def _alias(call: OpCall, k: int) -> list[Sig]:
    return keep_layout(call, k)


@rule(aten.zeros_like.default, aten.empty_like.default)
def _zeros_like(call: OpCall, k: int) -> list[Sig]:
    return keep_layout(call, k)  # zeros summed are zeros: P is fine


@rule(aten.ones_like.default, aten.full_like.default)
def _ones_like(call: OpCall, k: int) -> list[Sig]:
    # the value does not depend on the input, so a P input may serve as B (no boxing needed)
    return keep_layout(call, k, partial_ok=False) + [Sig((P,), (B,))]


@rule(aten.copy_.default)
def _copy(call: OpCall, k: int) -> list[Sig]:
    dst, src = call.tensors
    same_shape = dst.shape == src.shape
    sigs = [Sig((S(d), S(d)), (S(d),)) for d in range(dst.ndim) if same_shape]
    return sigs + [Sig((P, P), (P,)), Sig((B, B), (B,))]
