"""Test helpers for shardflow and its users: run test bodies on pooled multi-process gloo ranks."""

from shardflow.testing.ranks import RankError, RankTimeoutError, run_on_ranks, shutdown_pools, with_ranks

__all__ = ["RankError", "RankTimeoutError", "run_on_ranks", "shutdown_pools", "with_ranks"]
