"""Pick an nd-SBP signature for an op call: the product of per-axis candidates, priced by boxing.

The price of a signature is the boxing time (``plan_boxing(...).seconds``) to bring every input from its
current layout to the one the signature needs. Ties go to the earlier candidate, so rules order their
signatures by preference (no communication, then cheap, then all-``B``). Pure and deterministic: every
rank picks the same signature.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from shardflow.boxing import plan_boxing
from shardflow.ops.registry import RULES, OpCall, Sig, TensorMeta
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, NdSbp, P, Placement, S, format_sbp


class NoRuleError(NotImplementedError):
    """An op has no layout rule; the message names the op and where to add one."""


def candidates(call: OpCall, mesh: Mesh) -> list[list[Sig]]:
    fn = RULES.get(call.func)
    if fn is None:
        raise NoRuleError(
            f"shardflow has no layout rule for {call.func}; add one with @rule({call.func}) in a module of "
            f"shardflow/ops/rules/, or call .full() / .to_local() and use plain tensors"
        )
    per_axis = []
    for k in mesh.shape:
        sigs = [s for s in fn(call, k) if len(s.ins) == len(call.tensors)]
        if not sigs:
            raise AssertionError(f"layout rule of {call.func} offered no signature")  # rules end with all-B
        per_axis.append(sigs)
    return per_axis


def reduces_to_split(cur: NdSbp, need: NdSbp) -> bool:
    """Whether converting ``cur`` to ``need`` reduce-scatters partial sums into a split on some axis."""
    return any(c == P and isinstance(n, S) for c, n in zip(cur, need))


def communicates(cur: NdSbp, need: NdSbp) -> bool:
    """Whether converting ``cur`` to ``need`` sends anything: only ``B -> S``, ``B -> P`` and ``S -> P``
    are local (slice, mask, pad)."""
    return any(c != n and c != B and not (isinstance(c, S) and n == P) for c, n in zip(cur, need))


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
    for order, combo in enumerate(itertools.product(*candidates(call, mesh))):
        ins = tuple(tuple(sig.ins[i] for sig in combo) for i in range(len(call.tensors)))
        if any(ins[i] != tuple(current[i]) for i in fixed):
            continue
        if not reduce_to_split and any(reduces_to_split(cur, need) for cur, need in zip(current, ins)):
            continue
        if any(communicates(current[i], ins[i]) for i in pinned):
            continue
        n_out = len(combo[0].outs)
        outs = tuple(tuple(sig.outs[j] for sig in combo) for j in range(n_out))
        cost = 0.0
        for meta, cur, need in zip(call.tensors, current, ins):
            if cur != need:  # NOTE: a free conversion (size-1 axis, empty tensor) still loses to none at all
                cost += 1e-9 + plan_boxing(meta.shape, meta.dtype, mesh, cur, mesh, need).seconds
        if wanted is not None:
            meta, want = wanted
            target = tuple(o if w is None else w for o, w in zip(outs[0], want))
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
