"""Each batch's lookups checked before any message: every rank checks the same global batch the same way,
so bad input raises the same clear error everywhere instead of leaving some ranks waiting in an all-to-all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from shardflow.embedding.lookups import Lookups, TableModule


def check_arguments(lookups: Lookups, args: Sequence[torch.Tensor], tables: Mapping[str, TableModule]) -> int:
    """Raise ``ValueError`` naming the table and the offending id or offset; return the batch size (the
    number of samples, the same for every lookup)."""
    batch: int | None = None
    for c in lookups.calls:
        t = tables[c.table]
        kind = "nn.EmbeddingBag" if t.bag else "nn.Embedding"
        where = f"table {c.table!r} ({kind} of {t.rows} rows)"
        ids = args[c.ids]
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            got = getattr(ids, "dtype", type(ids).__name__)
            raise TypeError(f"{where}: ids must be an int64 (or int32) tensor, got {got}")
        if ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= t.rows:
                bad = low if low < 0 else high
                at = int((ids.reshape(-1) == bad).nonzero()[0, 0])
                raise ValueError(f"{where} got id {bad} (at position {at} of its ids): ids must lie in [0, {t.rows})")
        if c.offsets is not None:
            offsets = args[c.offsets]
            if offsets.dim() != 1 or offsets.dtype not in (torch.int64, torch.int32):
                raise ValueError(
                    f"{where}: offsets must be a 1-D int64 tensor, got {offsets.dtype} {tuple(offsets.shape)}"
                )
            n = ids.numel()
            if len(offsets) and int(offsets[0]) != 0:
                raise ValueError(f"{where}: offsets must start at 0 (nn.EmbeddingBag's format), got {int(offsets[0])}")
            steps = offsets[1:] - offsets[:-1]
            if len(steps) and int(steps.min()) < 0:
                i = int((steps < 0).nonzero()[0, 0])
                raise ValueError(f"{where}: offsets must not decrease; offsets[{i + 1}] < offsets[{i}]")
            if len(offsets) and int(offsets[-1]) > n:
                raise ValueError(
                    f"{where}: offsets point past the ids: the last is {int(offsets[-1])}, there are {n} ids"
                )
            if t.include_last_offset and (not len(offsets) or int(offsets[-1]) != n):
                raise ValueError(
                    f"{where}: with include_last_offset=True the last offset must be the number of ids ({n})"
                )
            samples = len(offsets) - int(t.include_last_offset)
        else:
            samples = ids.shape[0] if ids.dim() else 1
        if c.weights is not None:
            w = args[c.weights]
            if w.shape != ids.shape or not w.is_floating_point():
                raise ValueError(
                    f"{where}: per_sample_weights must be floats of the ids' shape {tuple(ids.shape)}, "
                    f"got {w.dtype} {tuple(w.shape)}"
                )
        if batch is not None and samples != batch:
            raise ValueError(f"{where} got {samples} samples, another lookup of the same batch {batch}")
        batch = samples
    assert batch is not None
    return batch
