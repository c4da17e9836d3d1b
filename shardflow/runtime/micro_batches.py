"""A pipeline's global batch cut into micro-batches, and each micro-batch over a stage's data-parallel ranks.

Both cuts are ``tensor_split``'s, so micro-batches may differ by a row; each shard's loss is weighed by its
share of the batch's rows, so that the step's loss is the serial model's mean over rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch


class MicroBatches(NamedTuple):
    """This rank's shard of each micro-batch, and each shard's share of the batch's rows."""

    shards: list[list[Any]]
    weights: list[float]


def micro_batches(inputs: Sequence[Any], m: int, dp: int, dp_index: int, widest: int) -> MicroBatches:
    """``inputs`` (the batch along dim 0; other inputs as given) cut into ``m`` micro-batches, each cut over
    ``dp`` ranks, as rank ``dp_index`` holds them; ``widest``: the most data-parallel ranks of any stage."""
    rows = {x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0}
    if len(rows) != 1:
        raise ValueError(f"pipeline inputs must share one batch dim (dim 0); got batch sizes {sorted(rows)}")
    batch = rows.pop()
    if batch < m * widest:
        raise ValueError(
            f"a batch of {batch} rows leaves some of the {m} micro-batches x {widest} data-parallel ranks "
            f"empty; use at least {m * widest} rows or fewer micro_batches"
        )
    out, weights = [], []
    for j in range(m):
        shard = []
        for x in inputs:
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                x = x.tensor_split(m)[j].tensor_split(dp)[dp_index]
            shard.append(x)
        out.append(shard)
        weights.append(next(x.shape[0] for x in shard if isinstance(x, torch.Tensor) and x.dim() > 0) / batch)
    return MicroBatches(out, weights)
