"""Each 1-d route issues exactly the collective the boxing table names, counted by torch's CommDebugMode."""

from __future__ import annotations

import torch
from torch.distributed.tensor.debug import CommDebugMode

import shardflow as sf
from shardflow.testing import run_on_ranks

ROUTES = [  # (src, dst, the one collective expected, or None for a local route)
    (sf.S(0), sf.B, "all_gather"),
    (sf.P, sf.B, "all_reduce"),
    (sf.P, sf.S(1), "reduce_scatter"),
    (sf.S(0), sf.S(1), "all_to_all"),
    (sf.B, sf.S(0), None),
    (sf.B, sf.P, None),
    (sf.S(1), sf.P, None),
]


def _name(op: object) -> str:
    text = str(op)
    for key in ("all_gather", "allgather", "reduce_scatter", "allreduce", "all_reduce", "alltoall", "all_to_all"):
        if key in text:
            return {
                "allgather": "all_gather",
                "allreduce": "all_reduce",
                "alltoall": "all_to_all",
            }.get(key, key)
    return text


def _counts() -> list[tuple[str, dict[str, int]]]:
    mesh = sf.Mesh("cpu", (4,))
    out = []
    for src, dst, _ in ROUTES:
        x = sf.distribute(torch.randn(9, 6), mesh, src)  # uneven: 9 rows over 4 ranks
        with CommDebugMode() as mode:
            x.redistribute(dst)
        counts: dict[str, int] = {}
        for op, n in mode.get_comm_counts().items():
            counts[_name(op)] = counts.get(_name(op), 0) + n
        out.append((f"{src}->{dst}", counts))
    return out


def test_each_route_uses_exactly_its_collective():
    results = run_on_ranks(4, _counts)
    for rank_result in results:
        for (label, counts), (_, _, expected) in zip(rank_result, ROUTES):
            want = {} if expected is None else {expected: 1}
            assert counts == want, f"{label}: counted {counts}, expected {want}"
