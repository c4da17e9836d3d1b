"""An alpha-beta cost model for boxing steps: seconds = latency terms + bytes / bandwidth.

Ring algorithms on ``k`` ranks: all-gather and reduce-scatter move ``(k-1)/k`` of the full piece per rank,
all-reduce twice that, all-to-all ``(k-1)/k`` of the local. Local slices and zero-fills cost a memory
pass. The numbers only need to rank routes correctly; defaults are gloo-on-CPU-like and can be replaced.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """Link and memory speeds used to rank routes."""

    bandwidth: float = 2e9
    """Network bytes per second per rank."""
    latency: float = 30e-6
    """Seconds per message hop."""
    memory_bandwidth: float = 10e9
    """Local copy bytes per second."""
    launch: float = 20e-6
    """Seconds to issue one collective (Python, the backend's setup), whatever its size: one all-reduce
    costs less than a reduce-scatter plus an all-gather moving the same bytes."""

    def collective(self, kind: str, k: int, nbytes: int) -> float:
        """Seconds for ``kind`` on ``k`` ranks; ``nbytes`` is the full piece (gather out, scatter in, local)."""
        if k <= 1:
            return 0.0
        frac = (k - 1) / k
        if kind == "all_gather" or kind == "reduce_scatter" or kind == "all_to_all":
            return self.launch + (k - 1) * self.latency + frac * nbytes / self.bandwidth
        if kind == "all_reduce":
            return self.launch + 2 * (k - 1) * self.latency + 2 * frac * nbytes / self.bandwidth
        raise ValueError(f"unknown collective {kind!r}")

    def local(self, nbytes: int) -> float:
        return 1e-7 + nbytes / self.memory_bandwidth

    def p2p(self, max_bytes_per_rank: int, max_messages_per_rank: int) -> float:
        return max_messages_per_rank * self.latency + max_bytes_per_rank / self.bandwidth


DEFAULT_COST = CostModel()
