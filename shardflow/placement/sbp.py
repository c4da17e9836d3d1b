"""Layouts of a logical tensor over one mesh axis: ``S(dim)``, ``B``, ``P`` and ``Blocked(dim, blocks)``.

``Blocked(dim, k)`` splits each of ``k`` equal blocks of ``dim`` the way ``S`` splits a dim, and a rank holds
its pieces of all blocks one after another: a fused projection's weight (``c_attn``'s rows are q, k and v)
split by head. It is ``S(dim + 1)`` of the tensor viewed with ``dim`` unflattened to ``(k, size // k)``,
which is how shard boxes and boxing plans treat it (placement/shard.py ``unflatten``); DTensor's
``_StridedShard`` solves the same problem for FSDP over tensor parallel.

An nd-SBP is a plain tuple with one placement per mesh axis. Placements are frozen, hashable dataclasses
with short reprs so that plans can be cached by them and printed as people write them: ``(S(0), B)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class S:
    """Split along tensor ``dim``; uneven sizes follow ``torch.tensor_split`` (first ``n % k`` one larger)."""

    dim: int

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 0:
            raise ValueError(f"S(dim) needs a non-negative int dim, got {self.dim!r}")

    def __repr__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Blocked:
    """Split each of ``blocks`` equal blocks of ``dim`` like ``S(dim)``; a rank's pieces of the blocks are
    concatenated in block order (its local is what the op computes on its rows of a fused weight)."""

    dim: int
    blocks: int

    def __post_init__(self) -> None:
        for name in ("dim", "blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "dim" else 2):
                raise ValueError(f"Blocked(dim, blocks) needs an int dim >= 0 and blocks >= 2, got {self!r}")

    def __repr__(self) -> str:
        return f"Blocked({self.dim}, {self.blocks})"


def is_split(p: object) -> bool:
    """Whether ``p`` splits a dim over its axis (``S`` or ``Blocked``): shards are disjoint, not copies."""
    return isinstance(p, (S, Blocked))


@dataclass(frozen=True)
class _Broadcast:
    """Every rank of the axis holds the whole (piece of the) tensor."""

    def __repr__(self) -> str:
        return "B"


@dataclass(frozen=True)
class _Partial:
    """The logical value is the element-wise sum of the locals of the axis."""

    def __repr__(self) -> str:
        return "P"


B = _Broadcast()
P = _Partial()

Placement = S | Blocked | _Broadcast | _Partial
NdSbp = tuple[Placement, ...]


def is_placement(x: object) -> bool:
    return isinstance(x, (S, Blocked, _Broadcast, _Partial))


def format_sbp(sbp: NdSbp) -> str:
    """``(S(0), B)``; a 1-tuple prints as ``(S(0),)`` like Python."""
    return "(" + ", ".join(map(repr, sbp)) + ("," if len(sbp) == 1 else "") + ")"


def normalize_sbp(sbp: Placement | Sequence[Placement], mesh_ndim: int, tensor_ndim: int | None = None) -> NdSbp:
    """Turn user input into an nd-SBP tuple and validate it against the mesh and (optionally) tensor rank."""
    if is_placement(sbp):
        if mesh_ndim != 1:
            raise ValueError(
                f"a single placement {sbp!r} stands for an nd-SBP only on a 1-d mesh; this mesh has "
                f"{mesh_ndim} axes: pass a tuple with one placement per axis"
            )
        out: NdSbp = (sbp,)  # type: ignore[assignment]
    elif isinstance(sbp, (tuple, list)):
        out = tuple(sbp)
        bad = [p for p in out if not is_placement(p)]
        if bad:
            raise TypeError(f"sbp entries must be sf.S(dim), sf.B, sf.P or sf.Blocked, got {bad[0]!r} in {sbp!r}")
    else:
        raise TypeError(f"sbp must be a placement or a tuple of placements, got {type(sbp).__name__}: {sbp!r}")
    if len(out) != mesh_ndim:
        raise ValueError(
            f"sbp {format_sbp(out)} has {len(out)} entries but the mesh has {mesh_ndim} axes: "
            f"give one placement per mesh axis"
        )
    if tensor_ndim is not None:
        for p in out:
            if is_split(p) and p.dim >= tensor_ndim:  # type: ignore[union-attr]
                raise ValueError(
                    f"sbp {format_sbp(out)} is invalid for a {tensor_ndim}-d tensor: split dim must be < {tensor_ndim}"
                )
    return out


def grad_sbp(sbp: NdSbp) -> NdSbp:
    """The gradient rule: a gradient has its value's layout with ``P`` replaced by ``B``."""
    return tuple(B if isinstance(p, _Partial) else p for p in sbp)
