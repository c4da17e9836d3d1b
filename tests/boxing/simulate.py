"""A one-process reference for boxing plans: every rank's local held in a dict, each step applied by its
meaning (concatenate, sum, slice) rather than by the executor's code, so the planner can be property
tested on meshes of any size without processes."""

from __future__ import annotations

import itertools
import math

import torch

import shardflow as sf
from shardflow.boxing.plan import Plan
from shardflow.placement.sbp import _Partial
from shardflow.placement.shard import relative, shard_box


def _box(plan_shape, sbp, mesh, rank):
    return shard_box(plan_shape, sbp, mesh.shape, mesh.coord_of(rank))


def make_locals(full: torch.Tensor, mesh: sf.Mesh, sbp) -> dict[int, torch.Tensor]:
    """Locals of ``full`` in layout ``sbp``; P axes hold uneven random parts that sum to the value."""
    gen = torch.Generator().manual_seed(1)
    weights = {}
    for a, p in enumerate(sbp):
        if isinstance(p, _Partial):  # one weight vector per P axis, so B replicas stay identical
            w = torch.rand(mesh.shape[a], generator=gen, dtype=torch.float64) + 0.5
            weights[a] = w / w.sum()
    out = {}
    for r in mesh.ranks:
        coord = mesh.coord_of(r)
        base = full[tuple(slice(lo, hi) for lo, hi in _box(full.shape, sbp, mesh, r))]
        scale = 1.0
        for a, w in weights.items():
            scale *= float(w[coord[a]])
        out[r] = base * scale
    # make each P-group sum exactly to the value: put the remainder on the first coordinate of every group
    for r in mesh.ranks:
        coord = mesh.coord_of(r)
        if any(isinstance(p, _Partial) for p in sbp) and all(
            coord[a] == 0 for a, p in enumerate(sbp) if isinstance(p, _Partial)
        ):
            group = [
                mesh.rank_at(tuple(c if not isinstance(p, _Partial) else pc for c, p, pc in zip(coord, sbp, pcs)))
                for pcs in itertools.product(
                    *(range(n) if isinstance(p, _Partial) else [0] for p, n in zip(sbp, mesh.shape))
                )
            ]
            base = full[tuple(slice(lo, hi) for lo, hi in _box(full.shape, sbp, mesh, r))]
            out[r] = base - sum((out[g] for g in group if g != r), torch.zeros_like(base))
    return out


def reconstruct(locals_: dict[int, torch.Tensor], shape, mesh: sf.Mesh, sbp) -> torch.Tensor:
    """The logical tensor: tiles of S axes, sums over P axes, B replicas checked equal and counted once."""
    acc = torch.zeros(shape, dtype=torch.float64)
    for r in mesh.ranks:
        coord = mesh.coord_of(r)
        first = tuple(0 if p == sf.B else c for c, p in zip(coord, sbp))
        assert torch.equal(locals_[r], locals_[mesh.rank_at(first)]), f"B replicas differ at rank {r}"
        if first == coord:
            acc[tuple(slice(lo, hi) for lo, hi in _box(shape, sbp, mesh, r))] += locals_[r]
    return acc


def simulate(plan: Plan, locals_: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    shape = plan.shape
    for step in plan.steps:
        mesh = step.src_mesh
        new = {}
        if step.kind == "send_recv":
            for r in step.dst_mesh.ranks:
                dbox = _box(shape, step.dst, step.dst_mesh, r)
                out = torch.zeros(tuple(hi - lo for lo, hi in dbox), dtype=torch.float64)
                for t in step.transfers:
                    if t.dst == r:
                        sbox = _box(shape, step.src, mesh, t.src)
                        assert out[relative(t.box, dbox)].abs().sum() == 0, "a box arrived twice"
                        out[relative(t.box, dbox)] = locals_[t.src][relative(t.box, sbox)]
                new[r] = out
            locals_ = new
            continue
        for r in mesh.ranks:
            group = mesh.axis_slice(step.axis, r)
            sbox, dbox = _box(shape, step.src, mesh, r), _box(shape, step.dst, mesh, r)
            old = step.src[step.axis]
            if step.kind in ("all_gather", "all_to_all"):
                whole = torch.cat([locals_[g] for g in group], dim=old.dim)
                # the gathered piece spans the group's boxes along old.dim
                gbox = tuple(
                    (
                        min(_box(shape, step.src, mesh, g)[d][0] for g in group),
                        max(_box(shape, step.src, mesh, g)[d][1] for g in group),
                    )
                    for d in range(len(shape))
                )
                new[r] = whole[relative(dbox, gbox)]
            elif step.kind in ("all_reduce", "reduce_scatter"):
                total = sum((locals_[g] for g in group), torch.zeros_like(locals_[r]))
                new[r] = total[relative(dbox, sbox)]
            elif step.kind == "slice":
                new[r] = locals_[r][relative(dbox, sbox)]
            elif step.kind == "mask":
                new[r] = locals_[r] if mesh.coord_of(r)[step.axis] == 0 else torch.zeros_like(locals_[r])
            elif step.kind == "pad":
                out = torch.zeros(tuple(hi - lo for lo, hi in dbox), dtype=torch.float64)
                out[relative(sbox, dbox)] = locals_[r]
                new[r] = out
            else:
                raise AssertionError(step.kind)
        locals_ = new
    return locals_


def check_plan(shape, src_mesh, src, dst_mesh, dst) -> Plan:
    full = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(math.prod(shape) + 7))
    plan = sf.plan_boxing(tuple(shape), torch.float64, src_mesh, src, dst_mesh, dst)
    out = simulate(plan, make_locals(full, src_mesh, src))
    assert set(out) == set(dst_mesh.ranks)
    got = reconstruct(out, shape, dst_mesh, dst)
    torch.testing.assert_close(got, full, rtol=1e-9, atol=1e-9, msg=lambda m: f"{plan.explain()}\n{m}")
    return plan
