"""Gradient buckets: pack the gradients' collectives and launch each bucket as its last gradient is made.

Gradients needing one all-reduce over one slice of the mesh (partial sums wanted replicated) go into
all-reduce buckets; partial sums wanted split (ZeRO-2) into reduce-scatter buckets (FSDP's packing). A
bucket's launch is inserted right after the instruction making the last of its gradients, so its
communication overlaps the rest of backward (DDP's reducer, decided at compile time); what is left open is
launched where backward ends. The waits come after backward (``wait_buckets``). Any other conversion is
left to the caller (``Bucketing.later``), to run once backward ends.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from shardflow.boxing import plan_boxing, reduce_scatter_args
from shardflow.comm.buckets import Bucket, Bucketer, launch_all_reduce, launch_reduce_scatter
from shardflow.graph.ir.instr import Comm, Instr, Launch, Wait
from shardflow.graph.ir.step import Conversion, Gradient, StepIR, Waiting
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, P
from shardflow.placement.shard import local_shape
from shardflow.tensor.trace import Record


@dataclass(frozen=True)
class _Key:
    """A bucket's collective: an all-reduce over ``ranks``, or a reduce-scatter (ZeRO-2) keeping member
    ``me``'s piece; one bucket per collective and dtype."""

    ranks: tuple[int, ...]
    dtype: torch.dtype
    scatter: bool
    me: int = 0


@dataclass(frozen=True)
class _Piece:
    """A gradient in a bucket; in a reduce-scatter bucket with its split dim and every member's extent."""

    grad: Gradient
    dim: int = 0
    sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class AllReduced:
    """An all-reduce bucket as the cost model prices it: its ranks and this rank's bytes."""

    ranks: tuple[int, ...]
    nbytes: int


@dataclass
class Bucketing:
    """What the pass decided: launched buckets (waited after backward), gradients final where they are
    made, conversions left for after backward, and the communication it priced."""

    waits: list[Waiting] = field(default_factory=list)
    final: dict[int, str] = field(default_factory=dict)  # gradient index -> variable, no communication
    later: list[Conversion] = field(default_factory=list)
    scatter_seconds: float = 0.0  # reduce-scatters packed into buckets, priced as the planner prices them
    all_reduces: list[AllReduced] = field(default_factory=list)


def bucket_gradients(
    ir: StepIR, grads: Sequence[Gradient], mesh: Mesh, rank: int, bucket_bytes: int, record: Record
) -> Bucketing:
    """Insert the buckets' launches into ``ir.body`` (see the module docstring); launches of buckets still
    open go at the end. Runs before release points are set: it moves instructions."""
    assert not ir.releases, "gradient buckets go in before release points are set"
    out = Bucketing()
    bucketer: Bucketer[_Key, _Piece] = Bucketer(bucket_bytes)
    launches: dict[int, list[Instr]] = {}
    coord = mesh.coord_of(rank)
    made = {name: i for i, ins in reversed(list(enumerate(ir.body))) for name in ins.defs}  # first definition

    def launch(bucket: Bucket[_Key, _Piece], phase: str) -> Instr:
        key, names = bucket.key, tuple(p.grad.var for p in bucket.items)
        handle = ir.new_var()
        if key.scatter:
            dims, sizes = [p.dim for p in bucket.items], [p.sizes for p in bucket.items]
            fn = ir.const(functools.partial(launch_reduce_scatter, key.ranks, dims, sizes, key.me), "launch")
            # the packed pieces of every member stay with the collective until it completes, and on CPU gloo
            # reduce-scatters a copy of them: both live as long as this rank's pieces, until the wait
            packed = bucket.nbytes * len(key.ranks) * (2 if mesh.device_type == "cpu" else 1)
            label = f"gradient pieces of a reduce-scatter bucket of {len(names)}, with its packed send buffers"
            ir.store(handle, bucket.nbytes + packed, f"{label} ({phase})")
            where, route = f"gradient reduce-scatter bucket of {len(names)}", "reduce_scatter"
            total = bucket.nbytes * len(key.ranks)
        else:
            fn = ir.const(functools.partial(launch_all_reduce, key.ranks), "launch")
            ir.store(handle, bucket.nbytes, f"gradient bucket of {len(names)} ({phase})")
            where, route, total = f"gradient bucket of {len(names)}", "all_reduce", bucket.nbytes
            out.all_reduces.append(AllReduced(key.ranks, bucket.nbytes))
        out.waits.append(Waiting(handle, tuple(p.grad.k for p in bucket.items)))
        return Launch(out=handle, grads=names, fn=fn, comm=Comm(phase, where, route, None, tuple(key.ranks), total))

    for g in grads:
        if g.sbp == g.want:
            out.final[g.k] = g.var
            continue
        plan = plan_boxing(g.meta.shape, g.meta.dtype, mesh, g.sbp, mesh, g.want)
        # partial sums over some axes, wanted replicated there and unchanged elsewhere: one all-reduce over
        # the slice spanning those axes, whatever route the planner would take for the tensor alone
        axes = tuple(a for a, (src, dst) in enumerate(zip(g.sbp, g.want)) if src != dst)
        summed = all(g.sbp[a] == P and g.want[a] == B for a in axes)
        scatter = None if summed else reduce_scatter_args(plan, rank)
        if scatter is not None:  # partial sums wanted split (ZeRO-2): reduce-scattered in buckets
            members, dim, sizes, me = scatter
            record.other.append(("gradient bucket", plan, "reduce_scatter, packed with others"))
            out.scatter_seconds += plan.seconds
            shape = local_shape(g.meta.shape, g.want, mesh.shape, coord)
            nbytes = math.prod(shape[:dim]) * max(sizes) * math.prod(shape[dim + 1 :]) * g.meta.dtype.itemsize
            piece = _Piece(g, dim, tuple(sizes))
            full = bucketer.add(_Key(members, g.meta.dtype, True, me), piece, nbytes, weight=len(members))
        elif not summed or math.prod(mesh.shape[a] for a in axes) == 1:
            out.later.append(Conversion(g.k, g.var, plan))
            continue
        else:
            names = ", ".join(mesh.names[a] for a in axes)
            record.other.append(("gradient bucket", plan, f"one all_reduce over ({names})"))
            shape = local_shape(g.meta.shape, g.sbp, mesh.shape, coord)
            key = _Key(mesh.slice_over(axes, rank), g.meta.dtype, False)
            full = bucketer.add(key, _Piece(g), math.prod(shape) * g.meta.dtype.itemsize)
        if full is not None:
            after = max(made[p.grad.var] for p in full.items)  # the last of its gradients to be made
            launches.setdefault(after, []).append(launch(full, "backward"))
    body: list[Instr] = []
    for i, ins in enumerate(ir.body):
        body.append(ins)
        body += launches.get(i, [])
    ir.body[:] = body
    for bucket in bucketer.flush():
        ir.emit(launch(bucket, "after"))
    return out


def wait_buckets(ir: StepIR, waits: Sequence[Waiting]) -> dict[int, str]:
    """Wait for every bucket, in launch order; each bucketed gradient's variable after its wait."""
    done: dict[int, str] = {}
    for w in waits:
        names = tuple(ir.new_var() for _ in w.grads)
        ir.emit(Wait(outs=names, handle=w.handle))
        for n in names:
            ir.refs[n] = [w.handle]
        done.update(zip(w.grads, names))
    return done
