"""One step's schedule on this rank: its stage's forwards and backwards in ``schedule.py``'s order, with the
messages to and from the stages beside it.

No coordinator: both neighbours derive the same order, so point-to-point messages (``isend``/``irecv``)
match by order and tag, and the receive for the next action is posted before the current one computes, so
transfers overlap compute. Activation shapes are known at set-up, so receives need no size handshake.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist

from shardflow.comm.init import world
from shardflow.runtime import split_backward as split_passes
from shardflow.runtime.schedule import Action
from shardflow.runtime.stage_cut import shape_key

if TYPE_CHECKING:
    from shardflow.runtime.pipeline import PipelineModule


class _Posted(NamedTuple):
    """The receives posted for one action, and the buffers they fill."""

    works: list[Any]
    bufs: list[torch.Tensor]


class _Saved(NamedTuple):
    """What a micro-batch's forward leaves for its backward: the tensors it received and its outputs."""

    received: list[torch.Tensor]
    outs: list[torch.Tensor]


class Backward(NamedTuple):
    """What one micro-batch's backward leaves: the received inputs, their gradients, and the weights' pass
    still to run (None: done)."""

    inputs: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    split: split_passes.SplitBackward | None


def run_schedule(pm: PipelineModule, micro: list[list[Any]], weights: list[float]) -> list[torch.Tensor]:
    """Run this stage's actions on this rank's shards of the micro-batches ``micro``; the last stage returns
    each micro-batch's loss weighted by its share ``weights`` of the batch (the others nothing)."""
    first, last = pm.stage == 0, pm.stage == pm.stages - 1
    posted: dict[Action, _Posted] = {}
    saved: dict[int, _Saved] = {}
    # NOTE: a send holds its tensor until it is waited for. Activations sent after F(j) are waited for at
    # B(j) (the next stage has long received them: their gradient came back), gradients as soon as they
    # are done; holding every send to the end of the step would keep all m micro-batches' outputs alive
    # and undo what 1F1B saves.
    sent: dict[int, list[Any]] = {}
    sends: list[Any] = []
    losses: list[torch.Tensor] = []

    def post(a: Action) -> None:
        if a in posted:
            return
        c = pm.pieces[a.micro_batch]
        if a.kind == "F" and not first:  # activations, from the ranks of the stage before
            meta = pm._meta(micro[a.micro_batch])[pm.stage - 1]
            bufs = [torch.empty(shape, dtype=dtype) for shape, dtype in meta]
            pieces, tag = c.recv, 0
        elif a.kind == "B" and not last:  # gradients of what this rank sent, from the stage after
            meta = pm._meta(micro[a.micro_batch])[pm.stage]
            kept = [k for k, (_, d) in enumerate(meta) if d.is_floating_point]
            bufs = [torch.empty(meta[k][0], dtype=meta[k][1]) for k in kept]
            pieces, tag = [c.grads_in[k] for k in kept], 1
        else:
            posted[a] = _Posted([], [])
            return
        works = [dist.irecv(_rows(b)[p.rows], p.peer, tag=tag) for b, ps in zip(bufs, pieces) for p in ps]
        posted[a] = _Posted(works, bufs)

    for i, a in enumerate(pm.order):
        post(a)
        if i + 1 < len(pm.order):
            post(pm.order[i + 1])  # the next message travels while this action computes
        works, bufs = posted.pop(a)
        with pm.recorder.span("recv", f"wait {a}"):
            for w in works:
                w.wait()
        j = a.micro_batch
        if a.kind == "F":
            received = [b.requires_grad_(True) if b.is_floating_point() else b for b in bufs]
            args = [micro[j][k] if src == "input" else received[k] for src, k in pm.split.wiring[pm.stage]]
            with pm.recorder.span("compute", f"F{j}"), naming(pm, a):
                out = pm._run_stage(shape_key(micro[j]), args)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            if last:
                losses.append(outs[0].detach() * weights[j])
            else:
                to = pm.pieces[j].send
                sent[j] = [
                    dist.isend(_rows(o.detach().contiguous())[p.rows], p.peer, tag=0)
                    for o, ps in zip(outs, to)
                    for p in ps
                ]
            saved[j] = _Saved(received, outs)
        else:
            for w in sent.pop(j, []):
                w.wait()
            sends = [w for w in sends if not w.is_completed()]
            received, outs = saved.pop(j)
            pm._last_backward = j == pm.order[-1].micro_batch
            with pm.recorder.span("compute", f"B{j}"), naming(pm, a):
                inputs, dx, split = backward(pm, received, outs, bufs, weights[j])
            if not first:  # each received piece's gradient goes back to the rank it came from
                back = [ps for t, ps in zip(received, pm.pieces[j].grads_out) if t.is_floating_point()]
                sends += [
                    dist.isend(_rows(g if g is not None else torch.zeros_like(t))[p.rows], p.peer, tag=1)
                    for t, g, ps in zip(inputs, dx, back)
                    for p in ps
                ]
            if split is not None:  # the weights' gradients, once the inputs' are on their way
                with pm.recorder.span("compute", f"W{j}"), naming(pm, a):
                    split.weights()
                # the retained graph (activations only the first pass read) goes with its last reference
                split = out = outs = received = None  # type: ignore[assignment]
            pm._last_backward = False
    with pm.recorder.span("recv", "wait sends"):
        for w in [*sends, *(w for ws in sent.values() for w in ws)]:
            w.wait()
    return losses


def backward(
    pm: PipelineModule,
    received: list[torch.Tensor],
    outs: list[torch.Tensor],
    grads_in: list[torch.Tensor],
    weight: float,
) -> Backward:
    """One micro-batch's backward. The step's last backward on a data-parallel stage after the first computes only the
    inputs' gradients here (``runtime/split_backward.py``): the tail of every schedule waits for them, and
    on earlier micro-batches the split costs this stage more than the stage before gains. A tp stage's
    program computes both in one autograd node: nothing to split."""
    if pm.stage == pm.stages - 1:
        roots: list[torch.Tensor] = [outs[0] * weight]
        grads: list[torch.Tensor | None] = [None]
    else:
        floats = [o for o in outs if o.is_floating_point()]
        pairs = [(o, g) for o, g in zip(floats, grads_in) if o.requires_grad]
        roots, grads = [o for o, _ in pairs], [g for _, g in pairs]
    inputs = [t for t in received if t.is_floating_point()]
    split = None
    if inputs and pm._splits and pm._last_backward:
        split = split_passes.plan(roots, grads, inputs)
    if split is not None:
        return Backward(inputs, split.inputs_first(), split)
    torch.autograd.backward(roots, grads)
    return Backward(inputs, [t.grad for t in inputs], None)


@contextmanager
def naming(pm: PipelineModule, action: Action) -> Iterator[None]:
    """Add the stage, rank and action to an error raised by the stage's model code."""
    try:
        yield
    except Exception as exc:
        what = "forward" if action.kind == "F" else "backward"
        note = f"in pipeline stage {pm.stage} on rank {world()[0]}, {what} of micro-batch {action.micro_batch}"
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(note)
        raise


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a dim 0 to cut rows from (a 0-d tensor as one row; a view, so receiving into it fills ``t``)."""
    return t if t.dim() else t.reshape(1)
