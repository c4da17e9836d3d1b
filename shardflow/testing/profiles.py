"""Synthetic device profiles for tests of the cost model: every figure given, so a price can be worked out by
hand (instant element-wise work and launches unless a test says otherwise)."""

from __future__ import annotations

from shardflow.cost.profile import DeviceProfile, LinkFit

KINDS = ("all_reduce", "all_gather", "reduce_scatter")


def synthetic_profile(
    matmul: float = 1e12, latency: float = 0.0, bus_bandwidth: float = 1e9, **changes: object
) -> DeviceProfile:
    """A device of ``matmul`` FLOP/s and links of ``latency`` + bytes / ``bus_bandwidth`` for every kind on 2
    ranks (nothing else costs time), with ``changes`` to any other field."""
    fields: dict[str, object] = {
        "name": "synthetic",
        "device_type": "cpu",
        "source": "test",
        "calibrated": False,
        "flops": {"matmul": {"float32": matmul}, "vector": {"float32": 1e30}},
        "memory_bandwidth": 1e30,
        "launch": 0.0,
        "memory_bytes": 2**40,
        "collectives": tuple(LinkFit(k, 2, latency, bus_bandwidth) for k in KINDS),
        "node_size": 1024,
    }
    return DeviceProfile(**(fields | changes))  # type: ignore[arg-type]
