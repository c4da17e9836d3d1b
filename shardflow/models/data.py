"""Data for the reference models that needs no download: Python's own source as a byte-level text corpus,
random next-token batches from it, and a synthetic classification set.

Every helper draws from its own ``torch.Generator`` seeded by the caller, never from torch's global RNG, so
asking for data does not change how a model seeded afterwards (or before) is initialised.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

CHAR_VOCAB_SIZE = 256
"""Vocabulary of ``char_corpus``: one token per byte value."""


def char_corpus(max_bytes: int = 2 * 1024 * 1024) -> torch.Tensor:
    """The first ``max_bytes`` bytes of the standard library's top-level ``*.py`` files, sorted by name.

    Returns a 1-d int64 tensor of byte values (``< CHAR_VOCAB_SIZE``). Only the top-level folder is read, so
    installed packages (``site-packages``) never leak in; the text differs between Python versions, which is
    fine for parallel-versus-serial comparisons made on one machine.
    """
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 2:
        raise ValueError(f"max_bytes must be an int >= 2, got {max_bytes!r}")
    root = Path(os.__file__).parent
    buf = bytearray()
    for path in sorted(root.glob("*.py")):
        buf += path.read_bytes()
        if len(buf) >= max_bytes:
            break
    del buf[max_bytes:]
    if len(buf) < 2:
        raise RuntimeError(f"found no Python source under {root}: this Python ships its standard library compiled")
    return torch.frombuffer(buf, dtype=torch.uint8).long()


def batches(
    tokens: torch.Tensor, batch_size: int, block_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless stream of ``(x, y)`` next-token batches, each (batch_size, block_size) int64.

    Each row is a window of ``tokens`` at a random offset; ``y`` is ``x`` shifted one token ahead. The same
    ``seed`` gives the same stream; take a finite number with ``itertools.islice``.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-d tensor, got shape {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= block_size < tokens.numel():
        raise ValueError(
            f"block_size must be in [1, {tokens.numel() - 1}] for {tokens.numel()} tokens, got {block_size}"
        )
    return _windows(tokens.long(), batch_size, block_size, seed)


def _windows(
    tokens: torch.Tensor, batch_size: int, block_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(block_size)
    while True:
        starts = torch.randint(tokens.numel() - block_size, (batch_size, 1), generator=gen)
        idx = starts + offsets
        yield tokens[idx], tokens[idx + 1]


def random_classification(
    n: int, shape: int | Sequence[int], num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` standard-normal inputs of ``shape`` and their int64 labels in ``[0, num_classes)``.

    Labels come from a fixed random linear teacher (``argmax(x @ W)``), not coin flips, so the task can be
    learned rather than only memorised.
    """
    shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
    if n < 1 or not shape_t or any(s < 1 for s in shape_t):
        raise ValueError(f"need n >= 1 and a non-empty shape of positive sizes, got n={n}, shape={shape!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape_t), generator=gen)
    teacher = torch.randn(math.prod(shape_t), num_classes, generator=gen)
    y = (x.reshape(n, -1) @ teacher).argmax(dim=1)
    return x, y
