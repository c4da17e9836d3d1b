"""One step's sparse work for every table at once: ids routed, exchanged, looked up, pooled; gradients sent
back and the touched rows updated where they live.

Decision: a rank sends each table's *deduplicated* ids to the ranks holding them (one ``all_to_all_single``
for all tables, with per-step split sizes exchanged just before), the holders return those rows (or their
columns), and the rank pools its own bags from the unique rows with torch's ``embedding_bag``. OneFlow's
OneEmbedding shuffles unique rows this way; TorchRec pools at the owner and returns pooled vectors, which
carries fewer bytes for long bags of distinct ids but sends every duplicate id. With zipf ids, unique
rows are the smaller message, one mechanism serves every placement, and pooling by torch itself keeps
every mode (``sum``, ``mean``, ``max``, ``padding_idx``, per-sample weights) exact. Backward sends each unique
row's gradient back the same way (the split sizes known already), and the holder sums the gradients of each
row over all senders before its optimizer step: one update per touched row, as torch's sparse optimizers
make from a coalesced gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shardflow.embedding.lookups import Call
from shardflow.embedding.optimizers import apply
from shardflow.embedding.spec import Optimizer, RowWiseAdagrad
from shardflow.embedding.table import Shard, bounds


@dataclass
class LocalCall:
    """One lookup of this rank's samples: positions of its ids among the table's unique ids."""

    index: int  # its place among the method's lookups (the dense program takes their results in this order)
    inverse: torch.Tensor  # per id of this rank's samples (shape of the ids), into the table's unique ids
    offsets: torch.Tensor | None
    weights: torch.Tensor | None


@dataclass
class TableBatch:
    """A table's part of this rank's batch: its unique ids, who holds them, the calls reading them."""

    shard: Shard
    uniq: torch.Tensor
    sent: list[torch.Tensor]  # ids sent to each rank of the group
    calls: list[LocalCall] = field(default_factory=list)
    received: list[torch.Tensor] = field(default_factory=list)  # ids each rank asked this one for
    rows: torch.Tensor | None = None  # (unique, dim) leaf whose gradient is the table's gradient


@dataclass
class Routed:
    """This rank's batch for every table, routed (local work only: no messages yet)."""

    tables: list[TableBatch]
    send_counts: torch.Tensor  # (n, tables) ids sent to each rank, per table
    n_calls: int  # the method's lookups
    batch: int  # samples in the global batch
    recv_counts: torch.Tensor | None = None
    sent_bytes: int = 0  # all-to-all payload this rank sent other ranks for this batch (ids, rows, gradients)


class Exchange:
    """The sparse step over one group of ranks (the mesh's data-parallel axis)."""

    def __init__(self, shards: Sequence[Shard], group: Any, n: int, me: int, optimizer: Optimizer) -> None:
        self.shards = list(shards)
        self.group, self.n, self.me = group, n, me
        self.optimizer = optimizer
        self.sent_bytes = 0  # payload this rank sent other ranks in the last step's all-to-alls

    # -- routing ----------------------------------------------------------------------------------------
    def route(self, calls: Sequence[Call], args: Sequence[torch.Tensor], batch: int) -> Routed:
        """Split each call's global arguments to this rank's samples, deduplicate ids per table, route them."""
        lo, hi = bounds(batch, self.n)[self.me : self.me + 2]
        parts: dict[str, list[tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]] = {}
        for index, c in enumerate(calls):
            ids, offsets, weights = (None if k is None else args[k] for k in (c.ids, c.offsets, c.weights))
            assert ids is not None
            shard = self._shard(c.table)
            local_ids, local_offsets, local_weights = split_samples(
                shard.module.include_last_offset, ids, offsets, weights, lo, hi
            )
            parts.setdefault(c.table, []).append((index, local_ids, local_offsets, local_weights))
        tables = []
        for shard in self.shards:
            mine = parts.get(shard.module.name, [])
            flat = torch.cat([x.reshape(-1) for _, x, _, _ in mine]) if mine else torch.zeros(0, dtype=torch.int64)
            uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
            tb = TableBatch(shard, uniq, shard.holders(uniq))
            start = 0
            for index, x, off, w in mine:
                inv = inverse[start : start + x.numel()].reshape(x.shape)
                start += x.numel()
                tb.calls.append(LocalCall(index, inv, off, w))
            tables.append(tb)
        counts = torch.tensor([[len(t.sent[d]) for t in tables] for d in range(self.n)], dtype=torch.int64)
        return Routed(tables, counts.reshape(self.n, len(tables)), len(calls), batch)

    def _shard(self, name: str) -> Shard:
        return next(s for s in self.shards if s.module.name == name)

    # -- forward ----------------------------------------------------------------------------------------
    def exchange_ids(self, routed: Routed, group: Any = None) -> None:
        """The ids each rank asks this one for (split sizes first, then the ids of every table at once);
        ``group``: another process group over the same ranks (the prefetching thread's own)."""
        T = len(routed.tables)
        recv_counts = torch.empty_like(routed.send_counts)
        self._all_to_all(recv_counts.reshape(-1), routed.send_counts.reshape(-1), [T] * self.n, [T] * self.n, group)
        routed.recv_counts = recv_counts
        send = torch.cat(
            [t.sent[d] for d in range(self.n) for t in routed.tables] or [torch.zeros(0, dtype=torch.int64)]
        )
        recv = torch.empty(int(recv_counts.sum()), dtype=torch.int64)
        self._all_to_all(recv, send, recv_counts.sum(1).tolist(), routed.send_counts.sum(1).tolist(), group)
        routed.sent_bytes = (self._wire(routed.send_counts.sum(1).tolist()) + (self.n - 1) * T) * 8  # ids, counts
        chunks = iter(torch.split(recv, recv_counts.reshape(-1).tolist()))
        per_source = [[next(chunks) for _ in routed.tables] for _ in range(self.n)]
        for k, t in enumerate(routed.tables):
            t.received = [per_source[s][k] for s in range(self.n)]

    def lookup(self, routed: Routed) -> list[torch.Tensor]:
        """Rows to the ranks that asked, then each call's pooled (or per-id) vectors of this rank's samples."""
        assert routed.recv_counts is not None
        reply = []
        for s in range(self.n):
            for t in routed.tables:
                if t.shard.width(t.shard.me, backward=False):
                    reply.append(t.shard.weight[t.shard.local_rows(t.received[s])].reshape(-1))
        send = torch.cat(reply) if reply else torch.zeros(0)
        in_splits = [self._floats(routed.recv_counts[s], routed, self.me) for s in range(self.n)]
        out_splits = [self._floats(routed.send_counts[d], routed, d) for d in range(self.n)]
        recv = torch.empty(sum(out_splits))
        self._all_to_all(recv, send, out_splits, in_splits)
        routed.sent_bytes += self._wire(in_splits) * 4
        pieces = iter(torch.split(recv, [c * t.shard.width(d, False) for d in range(self.n)
                                         for c, t in zip(routed.send_counts[d].tolist(), routed.tables)]))  # fmt: skip
        got = [[next(pieces) for _ in routed.tables] for _ in range(self.n)]
        out: list[torch.Tensor | None] = [None] * routed.n_calls
        for k, t in enumerate(routed.tables):
            t.rows = _assemble(t, [got[d][k] for d in range(self.n)]).requires_grad_(True)
            for lc in t.calls:
                out[lc.index] = _pool(t, lc)
        assert all(x is not None for x in out)
        return out  # type: ignore[return-value]

    def _floats(self, counts: torch.Tensor, routed: Routed, holder: int) -> int:
        """Floats of rows in one message whose ids (``counts`` per table) rank ``holder`` answers."""
        return sum(c * t.shard.width(holder, backward=False) for c, t in zip(counts.tolist(), routed.tables))

    # -- backward ---------------------------------------------------------------------------------------
    def backward(self, routed: Routed, pooled: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """Each table's gradient per unique id from the pooled vectors' gradients, sent to the holders, summed
        per row over senders, and the touched rows updated there."""
        with torch.enable_grad():
            torch.autograd.backward(list(pooled), list(grads))
        sends = []
        for d in range(self.n):
            for t in routed.tables:
                g = t.rows.grad if t.rows is not None and t.rows.grad is not None else None
                if g is None:
                    g = torch.zeros(len(t.uniq), t.shard.module.dim)
                sends.append(_gradient_for(t, g, d).reshape(-1))
        send = torch.cat(sends) if sends else torch.zeros(0)
        assert routed.recv_counts is not None
        out_splits = [
            sum(c * t.shard.width(self.me, True) for c, t in zip(routed.recv_counts[s].tolist(), routed.tables))
            for s in range(self.n)
        ]
        in_splits = [
            sum(c * t.shard.width(d, True) for c, t in zip(routed.send_counts[d].tolist(), routed.tables))
            for d in range(self.n)
        ]
        recv = torch.empty(sum(out_splits))
        self._all_to_all(recv, send, out_splits, in_splits)
        routed.sent_bytes += self._wire(in_splits) * 4
        self.sent_bytes = routed.sent_bytes
        pieces = iter(torch.split(recv, [c * t.shard.width(self.me, True) for s in range(self.n)
                                         for c, t in zip(routed.recv_counts[s].tolist(), routed.tables)]))  # fmt: skip
        got = [[next(pieces) for _ in routed.tables] for _ in range(self.n)]
        squares: list[torch.Tensor] = []
        updates = []
        for k, t in enumerate(routed.tables):
            width = t.shard.width(self.me, True)
            ids = torch.cat(t.received)
            g = torch.cat([got[s][k].reshape(len(t.received[s]), width) for s in range(self.n)])
            rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
            summed = torch.zeros(len(rows), width).index_add_(0, inverse, g)
            updates.append((t, rows, summed))
            if isinstance(self.optimizer, RowWiseAdagrad) and t.shard.plan.placement == "column":
                squares.append((summed * summed).sum(dim=1))
        if squares:  # the row-wise accumulator of a column-split row: its squares summed over the row's shards
            flat = torch.cat(squares)
            if self.n > 1:
                dist.all_reduce(flat, group=self.group)
            squares = list(torch.split(flat, [len(s) for s in squares]))
        for t, rows, summed in updates:
            shard = t.shard
            shard.steps += 1
            whole_rows = None  # a column shard's rows: the mean square over all their columns
            if isinstance(self.optimizer, RowWiseAdagrad) and shard.plan.placement == "column":
                whole_rows = squares.pop(0) / shard.module.dim
            if len(rows):
                apply(
                    self.optimizer, shard.weight, shard.state, shard.steps, shard.local_rows(rows), summed, whole_rows
                )

    def _wire(self, in_splits: list[int]) -> int:
        """Elements this rank sends to other ranks (its part for itself never leaves it)."""
        return sum(in_splits) - in_splits[self.me]

    def _all_to_all(
        self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any = None
    ) -> None:
        if self.n == 1:
            out.copy_(inp)
            return
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group or self.group)


def split_samples(
    include_last_offset: bool,
    ids: torch.Tensor,
    offsets: torch.Tensor | None,
    weights: torch.Tensor | None,
    lo: int,
    hi: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A call's arguments for samples ``lo:hi`` of the global batch."""
    ids = ids.to(torch.int64)
    if offsets is None:  # 2-D bags or an nn.Embedding: samples are rows of ids
        return ids[lo:hi], None, None if weights is None else weights[lo:hi]
    offsets = offsets.to(torch.int64)
    ends = offsets if include_last_offset else torch.cat([offsets, torch.tensor([ids.numel()])])
    a, b = int(ends[lo]), int(ends[hi])
    local_offsets = ends[lo : hi + (1 if include_last_offset else 0)] - a
    return ids[a:b], local_offsets, None if weights is None else weights[a:b]


def _assemble(t: TableBatch, got: list[torch.Tensor]) -> torch.Tensor:
    """The unique ids' full rows from the holders' replies (or, replicated, from the local table)."""
    shard, dim = t.shard, t.shard.module.dim
    place = shard.plan.placement
    if place == "replicated":
        return shard.weight[t.uniq].clone()
    if place == "column":
        widths = [shard.col_bounds[d + 1] - shard.col_bounds[d] for d in range(len(got))]
        return torch.cat([g.reshape(len(t.uniq), w) for g, w in zip(got, widths)], dim=1)
    sizes = [len(x) for x in t.sent]  # row: the unique ids are sorted by holder; table: all to one
    return torch.cat([g.reshape(k, dim) for g, k in zip(got, sizes)])


def _pool(t: TableBatch, lc: LocalCall) -> torch.Tensor:
    """One call's result from the unique rows, by torch's own lookup (every mode and option exact)."""
    m, rows = t.shard.module, t.rows
    assert rows is not None
    pad = None
    if m.padding_idx is not None:
        where = (t.uniq == m.padding_idx).nonzero()
        pad = int(where[0, 0]) if len(where) else None
    with torch.enable_grad():
        if not m.bag:
            return F.embedding(lc.inverse, rows, padding_idx=pad)
        return F.embedding_bag(lc.inverse, rows, lc.offsets, mode=m.mode, per_sample_weights=lc.weights,
                               include_last_offset=m.include_last_offset, padding_idx=pad)  # fmt: skip


def _gradient_for(t: TableBatch, g: torch.Tensor, d: int) -> torch.Tensor:
    """The part of the unique rows' gradient ``g`` that rank ``d`` holds (rows, or columns)."""
    place, shard = t.shard.plan.placement, t.shard
    if place == "column":
        return g[:, shard.col_bounds[d] : shard.col_bounds[d + 1]]
    if place == "row":
        start = sum(len(t.sent[k]) for k in range(d))
        return g[start : start + len(t.sent[d])]
    if place == "table":
        return g if d == shard.plan.owner else g[:0]
    return g  # replicated: every rank applies every rank's gradient
