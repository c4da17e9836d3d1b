"""Pick an nd-SBP signature for an op call: the product of per-axis candidates, priced by boxing.

The price of a signature is the boxing time (``plan_boxing(...).seconds``) to bring every input from its
current layout to the one the signature needs. Ties go to the earlier candidate, so rules order their
signatures by preference (no communication, then cheap, then all-``B``). Pure and deterministic: every
rank picks the same signature.

``Blocked(dim, k)`` inputs (a fused projection split by head) are not in the rules' lists: an op that computes
each position of its split dims on its own (``LIFTABLE``: element-wise ops, permutations, size-keeping views,
matrix products, sums) has, for each ``S`` signature, the same signature with every split ``Blocked`` with
``k`` blocks, since a rank holds the same positions of every ``Blocked`` operand. Rules that change the
block structure (``split`` into the blocks, ``cat`` of them) list their ``Blocked`` signatures themselves.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

from shardflow.boxing import plan_boxing
from shardflow.ops.registry import RULES, OpCall, Sig, TensorMeta
from shardflow.ops.rules.shape import infer_shape
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, Blocked, NdSbp, P, Placement, S, format_sbp, is_split
from shardflow.placement.shard import has_shards

aten = torch.ops.aten


class NoRuleError(NotImplementedError):
    """An op has no layout rule; the message names the op and where to add one."""


# ops whose shard computation is the op itself and keeps each split position where it was (sizes checked)
LIFTABLE = {
    aten.detach.default, aten.alias.default, aten.clone.default, aten._to_copy.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
    aten.unsqueeze.default, aten.expand.default, aten.mm.default, aten.addmm.default, aten.bmm.default,
    aten.sum.dim_IntList, aten.sum.default, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten.mul.Scalar, aten.div.Scalar, aten.neg.default, aten.gelu.default, aten.gelu_backward.default,
    aten.relu.default, aten.threshold_backward.default, aten.silu.default, aten.silu_backward.default,
    aten.tanh.default, aten.tanh_backward.default, aten.zeros_like.default, aten.ones_like.default,
    aten.empty_like.default, aten.copy_.default, aten.add_.Tensor, aten.mul_.Tensor, aten.add.Scalar,
    aten.mul_.Scalar, aten.div_.Scalar, aten.lerp_.Scalar, aten.addcmul_.default, aten.addcdiv_.default,
    aten.sqrt.default, aten.sqrt_.default, aten.zero_.default, aten.pow.Tensor_Scalar,
}  # fmt: skip
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _lift(call: OpCall, sig: Sig, k: int) -> Sig | None:
    """``sig`` with every ``S`` made ``Blocked(dim, k)``; None where it has no split, a split dim does not
    hold ``k`` blocks, or a view changes a split dim's size."""
    if not any(isinstance(p, S) for p in sig.ins):
        return None
    sizes = {t.shape[p.dim] for t, p in zip(call.tensors, sig.ins) if isinstance(p, S)}
    if call.func in _VIEWS:
        out = infer_shape(math.prod(call.tensors[0].shape), call.args[1])
        sizes |= {out[p.dim] for p in sig.outs if isinstance(p, S)}
    if len(sizes) != 1 or sizes.pop() % k:
        return None

    def up(p: Placement) -> Placement:
        return Blocked(p.dim, k) if isinstance(p, S) else p

    return Sig(tuple(map(up, sig.ins)), tuple(map(up, sig.outs)))


def candidates(call: OpCall, mesh: Mesh, current: Sequence[NdSbp] = (), blocks: Sequence[int] = ()) -> list[list[Sig]]:
    """Per mesh axis, the op's signatures; ``Blocked`` ones lifted for the block counts in ``current`` (on
    that axis) and in ``blocks`` (on every axis: a compiler looking ahead before layouts are known)."""
    fn = RULES.get(call.func)
    if fn is None:
        raise NoRuleError(
            f"shardflow has no layout rule for {call.func}; add one with @rule({call.func}) in a module of "
            f"shardflow/ops/rules/, or call .full() / .to_local() and use plain tensors"
        )
    per_axis = []
    for axis, k in enumerate(mesh.shape):
        sigs = [s for s in fn(call, k) if len(s.ins) == len(call.tensors)]
        if not sigs:
            raise AssertionError(f"layout rule of {call.func} offered no signature")  # rules end with all-B
        counts = sorted({p.blocks for c in current if isinstance(p := c[axis], Blocked)} | set(blocks))
        if counts and call.func in LIFTABLE:
            lifted = [_lift(call, s, b) for b in counts for s in sigs]
            sigs = sigs[:-1] + [s for s in lifted if s is not None] + sigs[-1:]  # all-B stays last
        per_axis.append(sigs)
    return per_axis


def reduces_to_split(cur: NdSbp, need: NdSbp) -> bool:
    """Whether converting ``cur`` to ``need`` reduce-scatters partial sums into a split on some axis."""
    return any(c == P and is_split(n) for c, n in zip(cur, need))


def communicates(cur: NdSbp, need: NdSbp) -> bool:
    """Whether converting ``cur`` to ``need`` sends anything: only ``B -> S``, ``B -> P`` and ``S -> P``
    are local (slice, mask, pad)."""
    return any(c != n and c != B and not (is_split(c) and n == P) for c, n in zip(cur, need))


def choose(
    call: OpCall,
    mesh: Mesh,
    current: Sequence[NdSbp],
    fixed: Sequence[int] = (),
    wanted: tuple[TensorMeta, Sequence[Placement | None]] | None = None,
    after: Callable[[tuple[NdSbp, ...]], float] | None = None,
    reduce_to_split: bool = True,
    pinned: Sequence[int] = (),
) -> tuple[tuple[NdSbp, ...], tuple[NdSbp, ...]]:
    """(required input nd-SBPs, output nd-SBPs) of the cheapest signature; inputs in ``fixed`` (mutated
    in place) must keep their current layout. ``wanted = (meta, layout)`` prices the conversion of the
    (single) output to a layout a later consumer is known to need (None on an axis: any); ``after(outs)``
    adds what the output layouts will cost the consumers (a compiler that sees the graph knows them).
    ``reduce_to_split=False`` keeps partial sums from being reduce-scattered into a split input (they are
    reduced to ``B``): one of the whole-program policies the compiler prices (graph/lower.py). Inputs in
    ``pinned`` (parameters and their views) may only be converted locally: a parameter stays where the
    strategy put it, rather than being moved every step because its bytes look cheap next to an
    activation's; when no signature allows that, the constraint is dropped."""
    # (own cost, order, ins, outs) of every allowed signature; ``after`` is priced lazily, cheapest first
    found: list[tuple[float, int, tuple[NdSbp, ...], tuple[NdSbp, ...]]] = []
    for order, combo in enumerate(itertools.product(*candidates(call, mesh, current))):
        ins = tuple(tuple(sig.ins[i] for sig in combo) for i in range(len(call.tensors)))
        if any(ins[i] != tuple(current[i]) for i in fixed):
            continue
        if not reduce_to_split and any(reduces_to_split(cur, need) for cur, need in zip(current, ins)):
            continue
        if any(communicates(current[i], ins[i]) for i in pinned):
            continue
        n_out = len(combo[0].outs)
        outs = tuple(tuple(sig.outs[j] for sig in combo) for j in range(n_out))
        if not all(map(has_shards, ins + outs)):
            continue
        cost = 0.0
        for meta, cur, need in zip(call.tensors, current, ins):
            if cur != need:  # NOTE: a free conversion (size-1 axis, empty tensor) still loses to none at all
                cost += 1e-9 + plan_boxing(meta.shape, meta.dtype, mesh, cur, mesh, need).seconds
        if wanted is not None:
            meta, want = wanted
            target = tuple(o if w is None else w for o, w in zip(outs[0], want))
            if not has_shards(target):  # the wanted splits do not combine with this output's: keep only them
                target = tuple(B if w is None else w for w in want)
            if target != outs[0]:
                cost += 1e-9 + plan_boxing(meta.shape, meta.dtype, mesh, outs[0], mesh, target).seconds
        found.append((cost, order, ins, outs))
    best: tuple[float, int, tuple[NdSbp, ...], tuple[NdSbp, ...]] | None = None
    seen: dict[tuple[NdSbp, ...], float] = {}
    for cost, order, ins, outs in sorted(found, key=lambda f: (f[0], f[1])):
        if best is not None and cost >= best[0]:
            break  # after() >= 0: nothing further can win
        if after is not None:
            if outs not in seen:
                seen[outs] = after(outs)
            cost += seen[outs]
        if best is None or (cost, order) < best[:2]:
            best = (cost, order, ins, outs)
    if best is None and (pinned or not reduce_to_split):
        return choose(call, mesh, current, fixed, wanted, after)
    if best is None:
        layouts = [format_sbp(c) for c in current]
        raise ValueError(
            f"{call.func} modifies an input in place, but no signature keeps its layout {layouts[fixed[0]]}; "
            f"redistribute it first"
        )
    return best[2], best[3]
