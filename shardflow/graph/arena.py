"""Static placement: a lowered program's temporaries live at offsets of one arena fixed before the first step.

The lowering knows every value's bytes and the lines between which it is alive, so where it lives can be
decided once, as OneFlow's static graphs and TFLite's arena planner do: values whose lifetimes do not overlap
share bytes. Offsets come from greedy-by-size placement (Pisarchyk & Lee, "Efficient memory management for
deep neural net inference", 2020; XLA's heap simulator is alike): the largest block first, each at the lowest
offset free of every placed block alive at the same time. An op writes its result there through its ATen
``out=`` overload; an op without one (attention kernels, collectives, the local functions of sharded ops)
keeps allocating. The arena is allocated at the program's first run on the device of its arguments and held
from then on, so a step's placed temporaries cost no allocation and the program's memory is what it says.
Held whole, it also costs its bytes where the rest of memory peaks: ``select`` keeps out the blocks that
would raise the predicted peak (``arena=True``); ``arena="all"`` places everything it can (fixed addresses).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

ALIGN = 64  # bytes: every block starts on a cache line (and on any dtype's itemsize)


@functools.cache
def out_overload(func: torch._ops.OpOverload) -> tuple[torch._ops.OpOverload, tuple[str, ...]] | None:
    """``func``'s ``out=`` overload and its out argument names, when it takes exactly ``func``'s arguments
    and writes each of its tensor results; None for ops that alias or mutate, or return non-tensors."""
    schema = func._schema
    if any(a.alias_info is not None for a in schema.arguments) or any(r.alias_info is not None for r in schema.returns):
        return None
    if not schema.returns or any(str(r.type) != "Tensor" for r in schema.returns):
        return None
    want = [(a.name, str(a.type)) for a in schema.arguments]
    packet = func.overloadpacket
    for name in packet.overloads():
        overload = getattr(packet, name)
        args = overload._schema.arguments
        outs = [a for a in args if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write]
        rest = [(a.name, str(a.type)) for a in args if a not in outs]
        if outs and len(outs) == len(schema.returns) and rest == want:
            return overload, tuple(a.name for a in outs)
    return None


def assign(blocks: Mapping[str, tuple[int, int, int]]) -> tuple[dict[str, int], int]:
    """Offsets for ``blocks`` (key -> (bytes, first line, last line)) such that blocks alive on a common line
    never share bytes, and the arena's size: greedy by size, each at the lowest offset that fits."""
    order = sorted(blocks, key=lambda k: (-blocks[k][0], blocks[k][1], k))
    placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last)
    offsets: dict[str, int] = {}
    for key in order:
        size = -(-max(blocks[key][0], 1) // ALIGN) * ALIGN
        _, first, last = blocks[key]
        taken = sorted((o, e) for o, e, f, la in placed if f <= last and first <= la)
        offset = 0
        for o, e in taken:
            if offset + size <= o:
                break
            offset = max(offset, e)
        offsets[key] = offset
        placed.append((offset, offset + size, first, last))
    return offsets, max((e for _, e, _, _ in placed), default=0)


def select(blocks: Mapping[str, tuple[int, int, int]], base: Sequence[int]) -> set[str]:
    """Which of ``blocks`` (key -> (bytes, first line, last line)) to place, given the bytes ``base`` the
    allocator holds on each line besides them. The arena is held whole, so the peak with placement is about
    the arena (the most placed bytes alive on any line) plus the allocator's peak, which need not fall on the
    same line: placing a block can raise the peak. Starting from all of them, blocks leave one at a time,
    each time the one whose leaving gives the lowest estimate, down to none; the best set on that path wins
    (the empty set, the plain allocator, is on it: by the estimate, placement never raises the peak)."""
    keys = list(blocks)
    if not keys:
        return set()
    n = max(len(base), 1 + max(last for _, _, last in blocks.values()))
    sizes = np.array([-(-max(blocks[k][0], 1) // ALIGN) * ALIGN for k in keys], dtype=np.int64)
    alive = np.zeros((len(keys), n), dtype=np.int64)
    for row, k in enumerate(keys):
        alive[row, blocks[k][1] : blocks[k][2] + 1] = sizes[row]
    placed = alive.sum(axis=0)
    other = np.zeros(n, dtype=np.int64)
    other[: len(base)] = base
    inside = np.ones(len(keys), dtype=bool)
    best = int(placed.max() + other.max())
    best_inside = inside.copy()
    while inside.any():
        rows = np.flatnonzero(inside)
        # only a block alive where the placed bytes peak can lower the arena (others only add to the rest)
        at_peak = np.flatnonzero(placed == placed.max())
        rows = rows[(alive[rows][:, at_peak] > 0).any(axis=1)] if placed.max() > 0 else rows
        estimate = (placed[None, :] - alive[rows]).max(axis=1) + (other[None, :] + alive[rows]).max(axis=1)
        j = int(estimate.argmin())
        row = rows[j]
        inside[row] = False
        placed -= alive[row]
        other += alive[row]
        if estimate[j] < best:
            best, best_inside = int(estimate[j]), inside.copy()
    return {k for k, keep in zip(keys, best_inside) if keep}


@dataclass
class Arena:
    """The blocks of one program: ``views[j]`` is block ``j`` as a tensor of its shape and dtype, made at the
    first run (``fill``) inside one byte buffer of ``nbytes``."""

    nbytes: int
    blocks: list[tuple[int, tuple[int, ...], torch.dtype]]  # (offset, local shape, dtype)
    views: list[torch.Tensor] = field(default_factory=list)
    buffer: torch.Tensor | None = None

    def fill(self, args: Iterable[Any]) -> None:
        """Allocate the arena on the device of the first tensor in ``args`` and make the blocks' views."""
        device = next((a.device for a in tree_flatten(list(args))[0] if isinstance(a, torch.Tensor)), "cpu")
        self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        for offset, shape, dtype in self.blocks:
            n = math.prod(shape) * dtype.itemsize
            self.views.append(self.buffer[offset : offset + n].view(dtype).view(shape))


def check_placed(value: Any, block: torch.Tensor, op: str) -> None:
    """The checked program's assertion that ``op`` wrote its result into its arena block, not elsewhere."""
    for v, b in zip(value if isinstance(value, tuple) else (value,), block if isinstance(block, tuple) else (block,)):
        if v.data_ptr() != b.data_ptr() or v.shape != b.shape:
            raise AssertionError(f"{op} did not write into its arena block (got {tuple(v.shape)} at another address)")


def check_outside(value: Any, arena: Arena, op: str) -> None:
    """The checked program's assertion that a local function's result holds no arena bytes: placement takes
    its result for a new storage, as its op's schema says, so a view of a placed input would be overwritten."""
    assert arena.buffer is not None
    start = arena.buffer.data_ptr()
    for v in tree_flatten(value)[0]:
        if isinstance(v, torch.Tensor) and v.numel() and start <= v.data_ptr() < start + arena.nbytes:
            raise AssertionError(f"the local function of {op} returned a view of an input placed in the arena")
