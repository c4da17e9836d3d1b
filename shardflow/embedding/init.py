"""``init_rows``: a table's rows drawn from a counter-based generator, so any row is made on its own.

A table too large to build is made on the meta device; each rank then draws only the rows it holds, and
every placement (and a plain reference) holds the same values. Each value is a pure function of (seed,
table name, row, column): splitmix64 hashes of the counter give two uniforms, Box-Muller one N(0, 1)
draw, as ``nn.EmbeddingBag`` initialises. numpy's uint64 arithmetic wraps, as the hash needs.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose outputs look independent for counters."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(name: str, seed: int) -> np.uint64:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def init_rows(name: str, rows: torch.Tensor, dim: int, seed: int = 0, cols: slice | None = None) -> torch.Tensor:
    """Rows ``rows`` (1-D int64 row indices) of table ``name`` (its module name), float32, N(0, 1) values;
    ``cols``: only those columns (a column shard), the same values as the whole rows have there."""
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(
            f"init_rows: rows must be a 1-D int64 tensor of row indices, got {rows.dtype} {tuple(rows.shape)}"
        )
    cols = cols or slice(0, dim)
    col = np.arange(cols.start, cols.stop, dtype=np.uint64)
    row = rows.numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        counter = (row[:, None] * np.uint64(dim) + col[None, :]) * np.uint64(2)
        base = _key(name, seed) + counter * _GOLDEN
        a, b = _mix(base), _mix(base + _GOLDEN)
    u1 = ((a >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # (0, 1): log is finite
    u2 = (b >> np.uint64(11)).astype(np.float64) * 2.0**-53
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return torch.from_numpy(z.astype(np.float32)).reshape(len(row), len(col))
