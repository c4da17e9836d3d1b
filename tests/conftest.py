"""Shared pytest hooks for the shardflow test suite."""

import sys


def pytest_sessionfinish() -> None:
    """Stop pooled gloo ranks (shardflow.testing) so no worker outlives the session."""
    ranks = sys.modules.get("shardflow.testing.ranks")  # only if some test used it: avoids importing torch
    if ranks is not None:
        ranks.shutdown_pools()
