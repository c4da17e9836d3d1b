"""Pick an nd-SBP signature for an op call: the product of per-axis candidates, priced by boxing.

The price of a signature is the boxing time (``plan_boxing(...).seconds``) to bring every input from its
current layout to the one the signature needs. Ties go to the earlier candidate, so rules order their
signatures by preference (no communication, then cheap, then all-``B``). Pure and deterministic: every
rank picks the same signature.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from shardflow.boxing import plan_boxing
from shardflow.ops.registry import RULES, OpCall, Sig, TensorMeta
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import NdSbp, Placement, format_sbp


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


def choose(
    call: OpCall,
    mesh: Mesh,
    current: Sequence[NdSbp],
    fixed: Sequence[int] = (),
    wanted: tuple[TensorMeta, Sequence[Placement | None]] | None = None,
) -> tuple[tuple[NdSbp, ...], tuple[NdSbp, ...]]:
    """(required input nd-SBPs, output nd-SBPs) of the cheapest signature; inputs in ``fixed`` (mutated
    in place) must keep their current layout. ``wanted = (meta, layout)`` prices the conversion of the
    (single) output to a layout a later consumer is known to need (None on an axis: any)."""
    best: tuple[float, tuple[NdSbp, ...], tuple[NdSbp, ...]] | None = None
    for combo in itertools.product(*candidates(call, mesh)):
        ins = tuple(tuple(sig.ins[i] for sig in combo) for i in range(len(call.tensors)))
        if any(ins[i] != tuple(current[i]) for i in fixed):
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
        if best is None or cost < best[0]:
            best = (cost, ins, outs)
    if best is None:
        layouts = [format_sbp(c) for c in current]
        raise ValueError(
            f"{call.func} modifies an input in place, but no signature keeps its layout {layouts[fixed[0]]}; "
            f"redistribute it first"
        )
    return best[1], best[2]
