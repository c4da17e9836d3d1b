"""Scaled dot-product attention kernels (CPU flash; CUDA flash and memory-efficient): a split of the batch or
the heads passes through. Grouped-query attention (fewer key/value heads than query heads, each shared by a
group) splits its heads where every rank's query heads are the groups of its own key/value heads.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from shardflow.ops.registry import B, LocalContext, OpCall, P, PreparedFn, S, Sig, prepared, rule
from shardflow.ops.rules.nn import _all_b, _arg, _masked, _meta, _slots, sig
from shardflow.placement.sbp import Placement
from shardflow.placement.shard import shard_box, split_range

aten = torch.ops.aten


# -- scaled dot-product attention (CPU flash kernel) ------------------------------------------------------


def _mask_place(call: OpCall, slot: int, d: int) -> Placement:
    """The placement of an attention mask broadcast against (batch, heads, L, S) when dim ``d`` is split."""
    m = _meta(call, slot)
    if m is None:
        return B
    i = d - (4 - m.ndim)
    return S(i) if i >= 0 and m.shape[i] > 1 else B


def _qkv_split(call: OpCall, first: int, d: int, k: int) -> bool:
    """Whether query, key and value (from schema position ``first``) are 4-d and a split of dim ``d`` in
    ``k`` parts keeps them matched: they agree along ``d``, or ``d`` is the heads of grouped-query attention
    (fewer key/value heads, each shared by a group of query heads) and every part of the query heads is the
    groups of the same part of the key/value heads."""
    q, key, v = (_meta(call, i) for i in range(first, first + 3))
    if q is None or key is None or v is None or {q.ndim, key.ndim, v.ndim} != {4} or key.shape[d] != v.shape[d]:
        return False
    return q.shape[d] == key.shape[d] or (d == 1 and _groups_align(q.shape[1], key.shape[1], k))


def _groups_align(hq: int, hkv: int, k: int) -> bool:
    rep = hq // hkv
    return hq == rep * hkv and all(
        split_range(hq, k, c) == tuple(i * rep for i in split_range(hkv, k, c)) for c in range(k)
    )


@rule(aten._scaled_dot_product_flash_attention_for_cpu.default)
def _sdpa(call: OpCall, k: int) -> list[Sig]:
    # (query, key, value, dropout_p, is_causal, *, attn_mask, scale) -> (output, logsumexp); (B, H, L, E)
    sigs = []
    for d in (0, 1):
        if _qkv_split(call, 0, d, k):
            sigs.append(sig(call, {0: S(d), 1: S(d), 2: S(d), 5: _mask_place(call, 5, d)}, (S(d), S(d))))
    return sigs + [_all_b(call, 2)]


@rule(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
def _sdpa_backward(call: OpCall, k: int) -> list[Sig]:
    # (grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask, scale)
    sigs = []
    for d in (0, 1):
        if _qkv_split(call, 1, d, k):
            place: dict[int, Placement] = {i: S(d) for i in range(6)}
            place[8] = _mask_place(call, 8, d)
            sigs.append(sig(call, place, (S(d),) * 3))
    sigs.append(sig(call, {0: P}, (P,) * 3))  # linear in the gradient
    return sigs + [_all_b(call, 3)]


@rule(aten._scaled_dot_product_efficient_attention.default)
def _sdpa_efficient(call: OpCall, k: int) -> list[Sig]:
    # CUDA: (query, key, value, attn_bias?, compute_log_sumexp, dropout_p, is_causal, *, scale)
    #   -> (output, logsumexp (B, H, L rounded up), philox_seed, philox_offset (0-d))
    sigs = []
    for d in (0, 1):
        if _qkv_split(call, 0, d, k):
            sigs.append(sig(call, {0: S(d), 1: S(d), 2: S(d), 3: _mask_place(call, 3, d)}, (S(d), S(d), B, B)))
    return sigs + [_all_b(call, 4)]


@rule(aten._scaled_dot_product_efficient_attention_backward.default)
def _sdpa_efficient_backward(call: OpCall, k: int) -> list[Sig]:
    # CUDA: (grad_out, query, key, value, attn_bias, out, logsumexp, philox_seed, philox_offset, dropout_p,
    #   grad_input_mask, is_causal, *, scale) -> (grad_q, grad_k, grad_v, grad_bias), None where not asked
    mask = [bool(m) for m in _arg(call, 10, (True, True, True, False))]
    sigs = []
    for d in (0, 1):
        if _qkv_split(call, 1, d, k):
            bias = _mask_place(call, 4, d)
            place: dict[int, Placement] = {i: S(d) for i in (0, 1, 2, 3, 5, 6)}
            place[4] = bias
            # a bias broadcast along the split dim gets a gradient summed over it: partial sums
            sigs.append(sig(call, place, _masked((S(d), S(d), S(d), bias if bias != B else P), mask)))
    sigs.append(sig(call, {0: P}, _masked((P,) * 4, mask)))  # linear in the gradient
    return sigs + [_all_b(call, sum(mask))]


@rule(aten._scaled_dot_product_flash_attention.default)
def _sdpa_flash(call: OpCall, k: int) -> list[Sig]:
    # CUDA, half precision: (query, key, value, dropout_p, is_causal, return_debug_mask, *, scale) -> (output,
    #   logsumexp (B, H, L), cum_seq_q, cum_seq_k (None), max_q, max_k (ints), rng_state, unused, debug_mask)
    sigs = []
    for d in (0, 1):
        if _qkv_split(call, 0, d, k):
            sigs.append(sig(call, {0: S(d), 1: S(d), 2: S(d)}, (S(d), S(d), B, B, B)))
    return sigs + [_all_b(call, 5)]


@rule(aten._scaled_dot_product_flash_attention_backward.default)
def _sdpa_flash_backward(call: OpCall, k: int) -> list[Sig]:
    # CUDA: (grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
    #   is_causal, philox_seed, philox_offset, *, scale) -> (grad_query, grad_key, grad_value)
    sigs = []
    for d in (0, 1):
        if _qkv_split(call, 1, d, k):
            sigs.append(sig(call, {i: S(d) for i in range(6)}, (S(d),) * 3))
    sigs.append(sig(call, {0: P}, (P,) * 3))  # linear in the gradient
    return sigs + [_all_b(call, 3)]


_ATTENTION = {  # kernel: schema position of the query (key and value follow)
    aten._scaled_dot_product_flash_attention_for_cpu.default: 0,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: 1,
    aten._scaled_dot_product_efficient_attention.default: 0,
    aten._scaled_dot_product_efficient_attention_backward.default: 1,
    aten._scaled_dot_product_flash_attention.default: 0,
    aten._scaled_dot_product_flash_attention_backward.default: 1,
}


@prepared(*_ATTENTION)
def _attention_local(ctx: LocalContext) -> PreparedFn:
    """The kernel on the shards, unless two mesh axes split grouped-query heads: per-axis rules cannot see
    that the nested pieces of query and key/value heads may not line up, so then the kernel runs on the
    whole tensors, gathered, and each rank keeps its pieces of the outputs (rare; always right)."""
    first = _ATTENTION[ctx.call.func]
    slots = _slots(ctx.call)
    iq, ik = slots.index(first), slots.index(first + 1)
    q, key = ctx.call.tensors[iq], ctx.call.tensors[ik]
    rep = q.shape[1] // max(key.shape[1], 1)
    for coord in itertools.product(*(range(n) for n in ctx.mesh.shape)):
        (a, b), (c, e) = (shard_box(t.shape, ctx.ins[i], ctx.mesh.shape, coord)[1] for t, i in ((q, iq), (key, ik)))
        if (a, b) != (c * rep, e * rep):
            return lambda args, kwargs: _on_whole(ctx, args, kwargs)
    return lambda args, kwargs: ctx.call.func(*args, **kwargs)


def _on_whole(ctx: LocalContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    flat, spec = tree_flatten((args, kwargs))
    metas, whole = iter(zip(ctx.call.tensors, ctx.ins)), []
    for x in flat:
        if isinstance(x, torch.Tensor):
            m, sbp = next(metas)
            x = ctx.box(x, sbp, m.shape, (B,) * ctx.mesh.ndim)
        whole.append(x)
    wargs, wkwargs = tree_unflatten(whole, spec)
    outs, out_spec = tree_flatten(ctx.call.func(*wargs, **wkwargs))
    laid = iter(zip(ctx.outs, [s for s in ctx.out_shapes if s is not None]))
    mine = []
    for o in outs:
        if isinstance(o, torch.Tensor):
            sbp, shape = next(laid)
            o = ctx.box(o, (B,) * ctx.mesh.ndim, shape, sbp)  # B to a split or B: a local slice
        mine.append(o)
    return tree_unflatten(mine, out_spec)
